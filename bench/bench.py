#!/usr/bin/env python3
"""Stock vs patched QEMU, side by side in one run.

    bench.py all OUT_DIR README STOCK_BUILD PATCHED_BUILD QEMU_PYTHON_DIR
    bench.py one SCENARIO BUILD QEMU_PYTHON_DIR     (one run, JSON out)

'all' runs every scenario on both builds, stock and patched in turn
(so that both see the same machine), REPEAT times, each run in its own
process group under a watchdog; it writes OUT_DIR/results.json,
OUT_DIR/results.md and OUT_DIR/divergence.png, and puts the table into
README between the bench markers.  A scenario whose option a build lacks
is reported "not applicable"; something that does not end within its
bound is reported as such, and is not repeated.
"""

import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                '..', 'tests', 'pylib'))
from qemu_procs import (MiB, QmpTimeout, StorageDaemon, Vm,  # noqa: E402
                        cpu_seconds, kill_group)

REPEAT = 5
# Throughput: this many rounds of one copy on each build, all in one
# process, after a copy on each that is not counted (the first copies are
# slow while tmpfs and page allocation warm up).  With one process per copy,
# as for the other scenarios, the spread was three times as wide.
ROUNDS = 9
DEAD_BOUND = 10.0     # how long we wait for a job that may never end
HUNG_BOUND = 20.0     # (patched: a cancelled job's stall-timeout is 10 s)
WATCHDOG = 120.0      # a run that takes longer is killed
SHM = '/dev/shm'


class NotApplicable(Exception):
    """The build lacks an option that the scenario needs"""


def Target(build, img, sock):
    """qemu-storage-daemon exporting img over NBD (unix socket sock),
    behind a throttle group that throttle() limits"""
    return StorageDaemon(build, img, sock, sock + '.qmp', fault_node=False)


class Source(Vm):
    """A QEMU (qtest accelerator, no guest code) with a raw source image
    behind a virtio-blk device and an NBD node as the mirror target"""

    def __init__(self, build, work, img, sock):
        # A command that does not answer within HUNG_BOUND is a hang
        super().__init__(build, work, timeout=HUNG_BOUND)
        self.ok('blockdev-add', {'node-name': 'src', 'driver': 'raw',
                                 'file': {'driver': 'file',
                                          'filename': img}})
        # The guest's disk: its writes go through the mirror filter
        self.ok('device_add', {'driver': 'virtio-blk-pci', 'id': 'vblk',
                               'drive': 'src'})
        self.ok('blockdev-add', {'node-name': 'tgt', 'driver': 'raw',
                                 'file': {'driver': 'nbd', 'export': 't',
                                          'server': {'type': 'unix',
                                                     'path': sock}}})

    def cmd(self, name, args=None, timeout=None):
        """The reply, or None if there was none in time"""
        try:
            return super().cmd(name, args, timeout)
        except QmpTimeout:
            return None

    def ok(self, name, args=None, timeout=None):
        r = self.cmd(name, args, timeout)
        if r is None or 'error' in r:
            raise RuntimeError(f'{name}: {r and r["error"]["desc"]}')
        return r['return']

    def mirror(self, **args):
        r = self.cmd('blockdev-mirror', dict(
            {'job-id': 'm', 'device': 'src', 'target': 'tgt', 'sync': 'full',
             'filter-node-name': 'top'}, **args))
        if r and 'error' in r and 'Parameter' in r['error']['desc']:
            raise NotApplicable(r['error']['desc'])
        if not r or 'error' in r:
            raise RuntimeError(f'blockdev-mirror: {r}')

    def pull_all(self):
        self.q.pull_events()

    def wait(self, names, timeout):
        """The first event named in names (seen before or until timeout),
        or None"""
        return self.q.wait_event(names, timeout)

    def count(self, name):
        return self.q.count(name)

    def write(self, offset, length, pattern=7):
        self.qemu_io('vblk/virtio-backend',
                     f'write -P {pattern} {offset} {length}')

    def job(self):
        jobs = self.ok('query-block-jobs')
        return jobs[0] if jobs else None


class Setup:
    """A source QEMU and a target daemon on tmpfs, for one run"""

    def __init__(self, build, size, data=False):
        self.build = build
        self.work = tempfile.mkdtemp(prefix='qemu-bench-', dir=SHM)
        self.src_img = self.image('src.img', size, data)
        self.tgt_img = self.image('tgt.img', size)
        sock = os.path.join(self.work, 'nbd.sock')
        self.target = Target(build, self.tgt_img, sock)
        self.q = Source(build, self.work, self.src_img, sock)

    def image(self, name, size, data=False):
        path = os.path.join(self.work, name)
        with open(path, 'wb') as f:
            f.truncate(size)
            # Allocate the tmpfs pages now, not while we measure
            os.posix_fallocate(f.fileno(), 0, size)
            if data:
                chunk = os.urandom(MiB)
                for _ in range(size // MiB):
                    f.write(chunk)
        return path

    def identical(self):
        return subprocess.run([f'{self.build}/qemu-img', 'compare',
                               '-f', 'raw', '-F', 'raw',
                               self.src_img, self.tgt_img],
                              stdout=subprocess.DEVNULL).returncode == 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.q.kill()
        kill_group(self.target.proc)
        shutil.rmtree(self.work)


# Scenarios: each takes a build directory and returns a dict of figures

def throughput_rounds(builds):
    """Scenario 1 on both builds ('STOCK,PATCHED'), alternating which one
    goes first"""
    stock, patched = builds.split(',')
    throughput(stock)
    throughput(patched)
    runs = {'stock': [], 'patched': []}
    for i in range(ROUNDS):
        order = [('stock', stock), ('patched', patched)]
        for name, build in order if i % 2 == 0 else reversed(order):
            runs[name].append(throughput(build))
    return runs


def throughput(build):
    with Setup(build, 1024 * MiB, data=True) as s:
        cpu0, start = cpu_seconds(s.q.proc.pid), time.monotonic()
        s.q.mirror()
        if not s.q.wait(['BLOCK_JOB_READY'], 300):
            raise RuntimeError('no BLOCK_JOB_READY')
        secs = time.monotonic() - start
        cpu = cpu_seconds(s.q.proc.pid) - cpu0
        return {'MiB/s': 1024 / secs, 'cpu_s_per_GiB': cpu}


def dead_target(build, policy):
    """The target dies while READY; the manager cancels (soft) while the
    guest writes, as in report 000"""
    with Setup(build, 64 * MiB) as s:
        s.q.mirror(**{'on-target-error': policy})
        s.q.wait(['BLOCK_JOB_READY'], 30)
        s.target.kill()
        cpu0, start = cpu_seconds(s.q.proc.pid), time.monotonic()
        s.q.cmd('block-job-cancel', {'device': 'm'})
        s.q.write(0, '4M')
        slowest, ended = 0.0, None
        while ended is None and time.monotonic() - start < DEAD_BOUND:
            t0 = time.monotonic()
            s.q.cmd('query-block-jobs')
            slowest = max(slowest, time.monotonic() - t0)
            s.q.pull_all()
            if s.q.wait(['BLOCK_JOB_COMPLETED', 'BLOCK_JOB_CANCELLED'], 0):
                ended = time.monotonic() - start
            time.sleep(0.05)
        cpu = cpu_seconds(s.q.proc.pid) - cpu0
        s.q.pull_all()
        return {'end_s': ended, 'errors': s.q.count('BLOCK_JOB_ERROR'),
                'cpu_s': cpu, 'slowest_qmp_s': slowest}


def hung_target(build, how):
    """The target stops answering (SIGSTOP) with guest writes in flight;
    then force cancel, soft cancel or quit"""
    with Setup(build, 64 * MiB) as s:
        s.q.mirror()
        s.q.wait(['BLOCK_JOB_READY'], 30)
        s.target.signal(signal.SIGSTOP)
        s.q.write(0, '8M')
        time.sleep(0.5)
        start = time.monotonic()
        if how == 'quit':
            return {'end_s': s.q.quit(HUNG_BOUND)}
        s.q.cmd('block-job-cancel', {'device': 'm', 'force': how == 'force'})
        left = HUNG_BOUND - (time.monotonic() - start)
        ev = s.q.wait(['BLOCK_JOB_COMPLETED', 'BLOCK_JOB_CANCELLED'], left)
        return {'end_s': time.monotonic() - start if ev else None}


def switchover(build, limit):
    """The guest writes 32 MiB faster than the 8 MiB/s target takes them;
    the manager completes as soon as the job says 'ready' (with limit:
    ready-dirty-limit 4 MiB, so 'ready' means at most 0.5 s behind)"""
    with Setup(build, 128 * MiB) as s:
        # Small copy operations, so that the progress moves in small steps
        args = {'buf-size': MiB}
        if limit:
            args['ready-dirty-limit'] = 4 * MiB
        s.q.mirror(**args)
        s.q.wait(['BLOCK_JOB_READY'], 30)
        s.target.throttle(8 * MiB)
        trace, start = [], time.monotonic()
        s.q.write(0, '32M')
        while True:
            job = s.q.job()
            now = time.monotonic() - start
            trace.append((now, job['len'] - job['offset'], job['status']))
            if job['status'] == 'ready' and now > 0.3:
                break
            time.sleep(0.05)
        t_complete = time.monotonic()
        s.q.cmd('block-job-complete', {'device': 'm'})
        while not s.q.wait(['BLOCK_JOB_COMPLETED'], 0.05):
            job = s.q.job()
            if job:
                trace.append((time.monotonic() - start,
                              job['len'] - job['offset'], 'completing'))
        stall = time.monotonic() - t_complete
        s.q.quit(HUNG_BOUND)
        return {'stall_s': stall, 'waited_for_ready_s': t_complete - start,
                'bound_s': 4 / 8.0 if limit else None,
                'identical': s.identical(), 'trace': trace}


def outage(build, retry):
    """The target is killed while READY and the guest writes, and comes
    back 0.5 s later; with retry-limit 10 the job should ride it out"""
    with Setup(build, 64 * MiB) as s:
        s.q.mirror(**({'retry-limit': 10} if retry else {}))
        s.q.wait(['BLOCK_JOB_READY'], 30)
        s.target.kill()
        s.q.write(0, '4M')
        time.sleep(0.5)
        s.target.start()
        survived = False
        deadline = time.monotonic() + DEAD_BOUND
        while time.monotonic() < deadline:
            job = s.q.job()
            if not job:
                break
            if job['offset'] == job['len'] and not job.get('retry-count'):
                survived = True
                break
            time.sleep(0.1)
        if survived:
            s.q.cmd('block-job-complete', {'device': 'm'})
            s.q.wait(['BLOCK_JOB_COMPLETED'], 30)
        s.q.quit(HUNG_BOUND)
        s.q.pull_all()
        return {'survived': survived, 'errors': s.q.count('BLOCK_JOB_ERROR'),
                'identical': survived and s.identical()}


def overhead(build, limit):
    """CPU that QEMU burns per GiB a READY job copies while the guest
    rewrites 1 GiB (with limit: ready-dirty-limit set, so the new check
    runs on every iteration)"""
    with Setup(build, 64 * MiB) as s:
        s.q.mirror(**({'ready-dirty-limit': 16 * MiB} if limit else {}))
        s.q.wait(['BLOCK_JOB_READY'], 30)
        cpu0 = cpu_seconds(s.q.proc.pid)
        for i in range(256):
            s.q.write((i % 16) * 4 * MiB, '4M', pattern=i)
        while True:
            job = s.q.job()
            if job['offset'] == job['len']:
                break
            time.sleep(0.01)
        cpu = cpu_seconds(s.q.proc.pid) - cpu0
        return {'cpu_s_per_GiB': cpu}


SCENARIOS = {
    'throughput': throughput_rounds,
    'dead-stop': lambda b: dead_target(b, 'stop'),
    'dead-report': lambda b: dead_target(b, 'report'),
    'dead-ignore': lambda b: dead_target(b, 'ignore'),
    'hung-force': lambda b: hung_target(b, 'force'),
    'hung-soft': lambda b: hung_target(b, 'soft'),
    'hung-quit': lambda b: hung_target(b, 'quit'),
    'switchover': lambda b: switchover(b, limit=False),
    'switchover-limit': lambda b: switchover(b, limit=True),
    'outage': lambda b: outage(b, retry=False),
    'outage-retry': lambda b: outage(b, retry=True),
    'overhead': lambda b: overhead(b, limit=False),
    'overhead-limit': lambda b: overhead(b, limit=True),
}

# (row title, figure shown, scenario on stock, scenario on patched)
ROWS = [
    ('1. mirror 1 GiB to NBD on tmpfs', 'MiB/s', 'throughput', 'throughput'),
    ('', 'CPU s per GiB', 'throughput', 'throughput'),
] + [
    (f'2. dead target, soft cancel, on-target-error={policy}'
     if i == 0 else '', figure, f'dead-{policy}', f'dead-{policy}')
    for policy in ('stop', 'report', 'ignore')
    for i, figure in enumerate(('time to end (s)', 'BLOCK_JOB_ERROR events',
                                'CPU s burnt', 'slowest QMP reply (s)'))
] + [
    ('3. hung target (SIGSTOP), force cancel', 'time to end (s)',
     'hung-force', 'hung-force'),
    ('3. hung target (SIGSTOP), soft cancel', 'time to end (s)',
     'hung-soft', 'hung-soft'),
    ('3. hung target (SIGSTOP), quit', 'time to exit (s)',
     'hung-quit', 'hung-quit'),
    ('4. switchover stall: complete at "ready" (stock: no limit, '
     'patched: ready-dirty-limit 4 MiB)', 'complete -> COMPLETED (s)',
     'switchover', 'switchover-limit'),
    ('', 'bound: limit / target rate (s)', 'switchover', 'switchover-limit'),
    ('', 'waited for "ready" (s)', 'switchover', 'switchover-limit'),
    ('', 'images identical', 'switchover', 'switchover-limit'),
    ('5. target killed, back 0.5 s later (stock: default policy, '
     'patched: retry-limit 10)', 'job survived', 'outage', 'outage-retry'),
    ('', 'BLOCK_JOB_ERROR events', 'outage', 'outage-retry'),
    ('', 'images identical', 'outage', 'outage-retry'),
    ('6. READY job, guest rewrites 1 GiB (patched: ready-dirty-limit '
     '16 MiB)', 'CPU s per GiB copied', 'overhead', 'overhead-limit'),
]

FIGURES = {
    'MiB/s': 'MiB/s', 'CPU s per GiB': 'cpu_s_per_GiB',
    'time to end (s)': 'end_s', 'time to exit (s)': 'end_s',
    'BLOCK_JOB_ERROR events': 'errors', 'CPU s burnt': 'cpu_s',
    'slowest QMP reply (s)': 'slowest_qmp_s',
    'complete -> COMPLETED (s)': 'stall_s', 'bound: limit / target rate (s)':
    'bound_s', 'waited for "ready" (s)': 'waited_for_ready_s',
    'images identical': 'identical', 'job survived': 'survived',
    'CPU s per GiB copied': 'cpu_s_per_GiB',
}


def one(scenario, build):
    try:
        result = SCENARIOS[scenario](build)
    except NotApplicable as e:
        result = {'not_applicable': str(e)}
    json.dump(result, sys.stdout)


def run_one(scenario, build, pydir, watchdog=WATCHDOG):
    """One run in its own process group; killed with all its QEMUs if it
    outlives the watchdog"""
    env = dict(os.environ, PYTHONPATH=pydir)
    p = subprocess.Popen([sys.executable, __file__, 'one', scenario, build,
                          pydir], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env,
                         start_new_session=True)
    try:
        # stderr: tracebacks of the QMP library's reader when QEMU dies
        out, err = p.communicate(timeout=watchdog)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        return {'error': f'killed after {watchdog:.0f} s'}
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)    # leftover QEMUs
        except ProcessLookupError:
            pass
    if p.returncode != 0:
        last = err.decode(errors='replace').strip().splitlines()[-1:]
        return {'error': f'exit status {p.returncode}: {" ".join(last)}'}
    return json.loads(out)


def never_ended(r):
    return 'end_s' in r and r['end_s'] is None


def run_all(builds, pydir):
    """results[scenario][build] = list of runs"""
    print(f'bench: throughput, {ROUNDS} rounds', file=sys.stderr, flush=True)
    r = run_one('throughput', ','.join(builds.values()), pydir,
                watchdog=WATCHDOG * 5)
    res = {'throughput': r if 'error' not in r else
           {name: [r] for name in builds}}
    for scenario in SCENARIOS:
        if scenario == 'throughput':
            continue
        runs = res[scenario] = {name: [] for name in builds}
        for i in range(REPEAT):
            # Stock first, then patched first: no build always goes first
            order = list(builds.items())
            for name, build in order if i % 2 == 0 else reversed(order):
                done = runs[name]
                # Something that never ends, or is not there, stays so
                if done and (never_ended(done[0]) or 'error' in done[0] or
                             'not_applicable' in done[0]):
                    continue
                print(f'bench: {scenario} {name} {i + 1}/{REPEAT}',
                      file=sys.stderr, flush=True)
                done.append(run_one(scenario, build, pydir))
    return res


def fmt(v):
    if isinstance(v, bool):
        return 'yes' if v else 'no'
    if isinstance(v, float):
        return f'{v:.3g}'
    return str(v)


def cell(runs, key, bound):
    """median (min-max) of a figure over the runs, or what went wrong"""
    if not runs:
        return ''
    first = runs[0]
    if 'not_applicable' in first:
        return 'not applicable (no such option)'
    if 'error' in first:
        return f"run failed: {first['error']}"
    if key == 'end_s' and never_ended(first):
        return f'never (not within {bound:.0f} s)'
    vals = [r[key] for r in runs]
    if any(v is None for v in vals):
        return 'n/a' if all(v is None for v in vals) else \
            f'{sum(v is None for v in vals)} of {len(vals)} never ended'
    if isinstance(vals[0], bool):
        return fmt(all(vals)) if len(set(vals)) == 1 else \
            f'{sum(vals)} of {len(vals)}'
    med = statistics.median(vals)
    if len(vals) == 1 or min(vals) == max(vals):
        return f'{fmt(med)}' + ('' if len(vals) > 1 else ' (1 run)')
    return f'{fmt(med)} ({fmt(min(vals))}-{fmt(max(vals))})'


def bound_of(scenario):
    return HUNG_BOUND if scenario.startswith('hung') else DEAD_BOUND


def median_of(runs, key):
    vals = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def table(res, machine):
    lines = [f"Machine: {machine['cores']} cores, {machine['cpu']}, "
             f"kernel {machine['kernel']}; load average "
             f"{machine['load_before']} before, {machine['load_after']} after; "
             f"{machine['date']}; {machine['minutes']:.1f} minutes.", '',
             f'Each cell: median (min-max) of {REPEAT} runs '
             f'({ROUNDS} for throughput, in one process after a warm-up '
             'copy of each that is not counted), stock and patched '
             'alternating, each run in its own process otherwise; a run '
             'that does not end within its bound is not repeated.', '',
             '| scenario | figure | stock | patched |',
             '| --- | --- | --- | --- |']
    for title, figure, s_sc, p_sc in ROWS:
        key = FIGURES[figure]
        lines.append(f"| {title} | {figure} | "
                     f"{cell(res[s_sc]['stock'], key, bound_of(s_sc))} | "
                     f"{cell(res[p_sc]['patched'], key, bound_of(p_sc))} |")
    lines += ['', '| ratio of the medians in this run | patched / stock |',
              '| --- | --- |']
    for what, scenario, key in (
            ('throughput (goal >= 0.98)', 'throughput', 'MiB/s'),
            ('CPU per GiB, bulk copy', 'throughput', 'cpu_s_per_GiB'),
            ('CPU per GiB, READY with guest writes', None, 'cpu_s_per_GiB'),
            ('switchover stall', None, 'stall_s')):
        if scenario:
            s, p = res[scenario]['stock'], res[scenario]['patched']
        elif key == 'stall_s':
            s, p = res['switchover']['stock'], \
                res['switchover-limit']['patched']
        else:
            s, p = res['overhead']['stock'], res['overhead-limit']['patched']
        ms, mp = median_of(s, key), median_of(p, key)
        ratio = f'{mp / ms:.3f}' if ms and mp is not None else 'n/a'
        lines.append(f'| {what} | {ratio} |')
    s, p = res['throughput']['stock'], res['throughput']['patched']
    pairs = [b['MiB/s'] / a['MiB/s'] for a, b in zip(s, p)
             if 'MiB/s' in a and 'MiB/s' in b]
    if pairs:
        lines.append(f'| throughput, median of the {len(pairs)} ratios of '
                     f'back-to-back runs (min-max) | '
                     f'{statistics.median(pairs):.3f} '
                     f'({min(pairs):.2f}-{max(pairs):.2f}) |')
    return '\n'.join(lines) + '\n'


def plot(res, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    colors = {'ready': '#c8e6c9', 'running': '#ffe0b2',
              'completing': '#e1bee7'}
    for ax, name, scenario in zip(axes, ('stock', 'patched'),
                                  ('switchover', 'switchover-limit')):
        runs = res[scenario][name]
        if not runs or 'trace' not in runs[0]:
            ax.set_title(f'{name}: not applicable')
            continue
        r = runs[0]
        tr = r['trace']
        ax.plot([x for x, _, _ in tr], [b / MiB for _, b, _ in tr],
                color='black')
        for (x0, _, st), (x1, _, _) in zip(tr, tr[1:]):
            ax.axvspan(x0, x1, color=colors.get(st, '#eeeeee'), lw=0)
        ax.axvline(r['waited_for_ready_s'], color='red', ls='--')
        limit = ', ready-dirty-limit 4 MiB' if name == 'patched' else ''
        ax.set_title(f"{name}{limit}: complete at the red line, "
                     f"done {r['stall_s']:.2f} s later")
        ax.set_ylabel('MiB left to copy')
    axes[-1].set_xlabel('seconds since the guest started writing 32 MiB '
                        '(target takes 8 MiB/s)')
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    fig.legend(handles, list(colors), loc='upper right')
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def update_readme(readme, text):
    begin, end = '<!-- bench:begin -->', '<!-- bench:end -->'
    with open(readme, encoding='utf-8') as f:
        content = f.read()
    head, rest = content.split(begin, 1)
    tail = rest.split(end, 1)[1]
    with open(readme, 'w', encoding='utf-8') as f:
        f.write(f'{head}{begin}\n{text}{end}{tail}')


def machine_info():
    cpu = 'unknown CPU'
    with open('/proc/cpuinfo', encoding='ascii', errors='replace') as f:
        for line in f:
            if line.startswith('model name'):
                cpu = line.split(':', 1)[1].strip()
                break
    return {'cores': os.cpu_count(), 'cpu': cpu,
            'kernel': platform.release()}


def main_all(out, readme, stock, patched, pydir):
    os.makedirs(out, exist_ok=True)
    start = time.monotonic()
    machine = machine_info()
    machine['load_before'] = f'{os.getloadavg()[0]:.2f}'
    res = run_all({'stock': stock, 'patched': patched}, pydir)
    machine['load_after'] = f'{os.getloadavg()[0]:.2f}'
    machine['date'] = time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())
    machine['minutes'] = (time.monotonic() - start) / 60
    with open(os.path.join(out, 'results.json'), 'w') as f:
        json.dump({'machine': machine, 'repeat': REPEAT, 'runs': res}, f,
                  indent=1)
    text = table(res, machine)
    with open(os.path.join(out, 'results.md'), 'w') as f:
        f.write(text)
    plot(res, os.path.join(out, 'divergence.png'))
    update_readme(readme, text)
    print(text)


if __name__ == '__main__':
    if sys.argv[1] == 'one':
        sys.path.insert(0, sys.argv[4])
        one(sys.argv[2], sys.argv[3])
    else:
        main_all(*sys.argv[2:7])
