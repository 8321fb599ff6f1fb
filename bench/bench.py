#!/usr/bin/env python3
"""Stock vs patched QEMU, side by side in one run.

    bench.py OUT_DIR STOCK_BUILD PATCHED_BUILD QEMU_PYTHON_DIR

Runs every scenario on both builds (repeated where it is a timing), and
writes OUT_DIR/results.json, OUT_DIR/results.md and OUT_DIR/divergence.png.
A scenario whose option the build lacks is reported "not applicable".
"""

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

OUT, BUILDS = sys.argv[1], {'stock': sys.argv[2], 'patched': sys.argv[3]}
sys.path.insert(0, sys.argv[4])
from qemu.qmp.legacy import QEMUMonitorProtocol  # noqa: E402

MiB = 1024 * 1024
REPEAT = 3
BOUND = 20.0          # how long we wait for something that may never end
WORK = tempfile.mkdtemp(prefix='qemu-bench-', dir='/dev/shm')


def cpu_seconds(pid):
    with open(f'/proc/{pid}/stat', encoding='ascii') as f:
        fields = f.read().rsplit(')', 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


class Target:
    """qemu-storage-daemon exporting an image over NBD (unix socket),
    optionally behind a throttle group limited to bps bytes/s"""

    def __init__(self, build, img, sock, bps=0):
        self.args = [f'{build}/storage-daemon/qemu-storage-daemon',
                     '--object', f'throttle-group,id=thr,x-bps-write={bps}',
                     '--blockdev', f'file,node-name=file,filename={img}',
                     '--blockdev', 'raw,node-name=raw,file=file',
                     '--blockdev', 'throttle,node-name=top,'
                                   'throttle-group=thr,file=raw',
                     '--nbd-server', f'addr.type=unix,addr.path={sock}',
                     '--export', 'nbd,id=e,node-name=top,name=t,writable=on']
        self.sock = sock
        self.start()

    def start(self):
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        self.proc = subprocess.Popen(self.args, stderr=subprocess.DEVNULL)
        while not os.path.exists(self.sock):
            time.sleep(0.01)

    def kill(self):
        self.proc.kill()
        self.proc.wait()

    def signal(self, sig):
        self.proc.send_signal(sig)

    def stop(self):
        self.proc.send_signal(signal.SIGCONT)
        self.kill()


class Source:
    """A QEMU with a source image and an NBD target node"""

    def __init__(self, build, img, sock):
        self.qmp_path = os.path.join(WORK, 'qmp.sock')
        self.qmp = QEMUMonitorProtocol(self.qmp_path, server=True)
        self.proc = subprocess.Popen(
            [f'{build}/qemu-system-x86_64', '-M', 'pc', '-accel', 'qtest',
             '-nodefaults', '-display', 'none',
             '-qmp', f'unix:{self.qmp_path}'],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.qmp.accept(BOUND)
        self.cmd('blockdev-add', {'node-name': 'src', 'driver': 'raw',
                                  'file': {'driver': 'file',
                                           'filename': img}})
        # The guest's disk: its writes go through the mirror filter
        self.ok('device_add', {'driver': 'virtio-blk-pci', 'id': 'vblk',
                               'drive': 'src'})
        self.cmd('blockdev-add', {'node-name': 'tgt', 'driver': 'raw',
                                  'file': {'driver': 'nbd', 'export': 't',
                                           'server': {'type': 'unix',
                                                      'path': sock}}})
        self.events = []

    def cmd(self, name, args=None):
        return self.qmp.cmd_raw(name, args or {})

    def ok(self, name, args=None):
        r = self.cmd(name, args)
        if 'error' in r:
            raise RuntimeError(f'{name}: {r["error"]["desc"]}')
        return r['return']

    def mirror(self, **args):
        return self.cmd('blockdev-mirror', dict(
            {'job-id': 'm', 'device': 'src', 'target': 'tgt', 'sync': 'full',
             'filter-node-name': 'top'}, **args))

    def pull(self, timeout=0.0):
        ev = self.qmp.pull_event(wait=timeout) if timeout else \
            self.qmp.pull_event(wait=False)
        if ev:
            self.events.append(ev)
        return ev

    def wait(self, names, timeout=BOUND):
        deadline = time.monotonic() + timeout
        for ev in self.events:
            if ev['event'] in names:
                return ev
        while time.monotonic() < deadline:
            try:
                ev = self.pull(min(0.1, deadline - time.monotonic()))
            except Exception:          # timeout of one pull
                continue
            if ev and ev['event'] in names:
                return ev
        return None

    def write(self, offset, length):
        self.ok('human-monitor-command', {
            'command-line': f'qemu-io -d vblk/virtio-backend '
                            f'"write -P 7 {offset} {length}"'})

    def job(self):
        jobs = self.ok('query-block-jobs')
        return jobs[0] if jobs else None

    def quit(self, timeout=BOUND):
        start = time.monotonic()
        try:
            self.qmp.cmd_raw('quit')
        except Exception:
            pass
        try:
            self.proc.wait(timeout)
            return time.monotonic() - start
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None
        finally:
            try:
                self.qmp.close()
            except Exception:       # QEMU is gone already
                pass


def image(name, size, data=False):
    path = os.path.join(WORK, name)
    with open(path, 'wb') as f:
        f.truncate(size)
        if data:
            chunk = os.urandom(MiB)
            for _ in range(size // MiB):
                f.write(chunk)
    return path


def setup(build, size, bps=0, data=False):
    src = image('src.img', size, data)
    tgt = image('tgt.img', size)
    sock = os.path.join(WORK, 'nbd.sock')
    target = Target(build, tgt, sock, bps)
    return Source(build, src, sock), target


def throughput(build):
    q, t = setup(build, 1024 * MiB, data=True)
    cpu0, start = cpu_seconds(q.proc.pid), time.monotonic()
    q.mirror()
    q.wait(['BLOCK_JOB_READY'], timeout=300)
    secs = time.monotonic() - start
    cpu = cpu_seconds(q.proc.pid) - cpu0
    q.quit()
    t.stop()
    return {'MiB/s': 1024 / secs, 'cpu_s_per_GiB': cpu}


def dead_target_cancel(build, policy):
    q, t = setup(build, 64 * MiB)
    q.mirror(**{'on-target-error': policy})
    q.wait(['BLOCK_JOB_READY'])
    t.kill()
    cpu0, start = cpu_seconds(q.proc.pid), time.monotonic()
    # As in the report: cancel, while the guest writes
    q.cmd('block-job-cancel', {'device': 'm'})
    q.write(0, '4M')
    slowest, ended = 0.0, None
    while time.monotonic() - start < BOUND:
        t0 = time.monotonic()
        q.cmd('query-block-jobs')
        slowest = max(slowest, time.monotonic() - t0)
        while True:
            try:
                ev = q.pull()
            except Exception:
                break
            if not ev:
                break
            if ev['event'] in ('BLOCK_JOB_COMPLETED', 'BLOCK_JOB_CANCELLED'):
                ended = time.monotonic() - start
        if ended is not None:
            break
        time.sleep(0.05)
    cpu = cpu_seconds(q.proc.pid) - cpu0
    errors = sum(1 for e in q.events if e['event'] == 'BLOCK_JOB_ERROR')
    q.quit()
    return {'end_s': ended, 'errors': errors, 'cpu_s': cpu,
            'slowest_qmp_s': slowest}


def hung_target(build, how):
    q, t = setup(build, 64 * MiB)
    q.mirror()
    q.wait(['BLOCK_JOB_READY'])
    t.signal(signal.SIGSTOP)
    q.write(0, '8M')
    time.sleep(0.5)
    start = time.monotonic()
    if how == 'quit':
        secs = q.quit()
    else:
        q.cmd('block-job-cancel', {'device': 'm', 'force': how == 'force'})
        ev = q.wait(['BLOCK_JOB_COMPLETED', 'BLOCK_JOB_CANCELLED'])
        secs = time.monotonic() - start if ev else None
        t.signal(signal.SIGCONT)
        q.quit()
    t.stop()
    return {'end_s': secs}


def switchover_stall(build, limit):
    """The guest writes 32 MiB faster than the 8 MiB/s target takes them;
    the manager completes as soon as the job says 'ready'"""
    q, t = setup(build, 128 * MiB, bps=8 * MiB)
    args = {'ready-dirty-limit': 4 * MiB} if limit else {}
    r = q.mirror(**args)
    if 'error' in r:
        q.quit()
        t.stop()
        return None
    q.wait(['BLOCK_JOB_READY'])
    trace, start = [], time.monotonic()
    q.write(0, '32M')
    while True:
        job = q.job()
        now = time.monotonic() - start
        trace.append((now, job['len'] - job['offset'], job['status']))
        if job['status'] == 'ready' and now > 0.3:
            break
        time.sleep(0.05)
    t_complete = time.monotonic()
    q.cmd('block-job-complete', {'device': 'm'})
    while not q.wait(['BLOCK_JOB_COMPLETED'], timeout=0.05):
        job = q.job()
        if job:
            trace.append((time.monotonic() - start,
                          job['len'] - job['offset'], 'completing'))
    stall = time.monotonic() - t_complete
    q.quit()
    t.stop()
    return {'stall_s': stall, 'trace': trace, 'bound_s': 4 / 8.0,
            'waited_for_ready_s': t_complete - start}


def transient_outage(build):
    q, t = setup(build, 64 * MiB)
    r = q.mirror(**{'retry-limit': 10})
    if 'error' in r:
        q.quit()
        t.stop()
        return None
    q.wait(['BLOCK_JOB_READY'])
    t.kill()
    q.write(0, '4M')
    time.sleep(0.5)
    t.start()
    survived = False
    deadline = time.monotonic() + BOUND
    while time.monotonic() < deadline:
        job = q.job()
        if not job:
            break
        if job['offset'] == job['len'] and job.get('retry-count', 0) == 0:
            survived = True
            break
        time.sleep(0.1)
    if survived:
        q.cmd('block-job-complete', {'device': 'm'})
        q.wait(['BLOCK_JOB_COMPLETED'])
    q.quit()
    t.stop()
    same = subprocess.run([f'{BUILDS[build_name(build)]}/qemu-img', 'compare',
                           '-f', 'raw', '-F', 'raw',
                           os.path.join(WORK, 'src.img'),
                           os.path.join(WORK, 'tgt.img')],
                          stdout=subprocess.DEVNULL).returncode == 0
    return {'survived': survived, 'identical': same}


def build_name(build):
    return [k for k, v in BUILDS.items() if v == build][0]


def stats(values):
    vals = [v for v in values if v is not None]
    if len(vals) < len(values):
        return {'min': None, 'median': None, 'max': None,
                'note': f'{len(values) - len(vals)} of {len(values)} '
                        f'did not end within {BOUND:.0f} s'}
    return {'min': min(vals), 'median': statistics.median(vals),
            'max': max(vals)}


def main():
    os.makedirs(OUT, exist_ok=True)
    res = {'machine': {'cores': os.cpu_count(),
                       'loadavg': open('/proc/loadavg').read().split()[:3],
                       'date': time.strftime('%Y-%m-%d %H:%M:%S')},
           'scenarios': {}}
    sc = res['scenarios']
    for name, build in BUILDS.items():
        runs = [throughput(build) for _ in range(REPEAT)]
        sc.setdefault('throughput', {})[name] = {
            'MiB/s': stats([r['MiB/s'] for r in runs]),
            'cpu_s_per_GiB': stats([r['cpu_s_per_GiB'] for r in runs])}
        for policy in ('stop', 'report', 'ignore'):
            r = dead_target_cancel(build, policy)
            sc.setdefault(f'dead target, soft cancel, {policy}', {})[name] = r
        for how in ('force', 'soft', 'quit'):
            runs = [hung_target(build, how)['end_s'] for _ in range(REPEAT)]
            sc.setdefault(f'hung target, {how}', {})[name] = stats(runs)
        sc.setdefault('switchover stall', {})[name] = \
            switchover_stall(build, limit=(name == 'patched'))
        sc.setdefault('transient outage', {})[name] = transient_outage(build)
    with open(os.path.join(OUT, 'results.json'), 'w') as f:
        json.dump(res, f, indent=1)
    write_markdown(res)
    plot(res)


def fmt(v):
    if v is None:
        return 'never (bound {:.0f} s)'.format(BOUND)
    if isinstance(v, float):
        return f'{v:.3g}'
    return str(v)


def cell(r):
    if r is None:
        return 'not applicable'
    if 'median' in r:
        if r['median'] is None:
            return r['note']
        return f"{fmt(r['median'])} ({fmt(r['min'])}-{fmt(r['max'])})"
    return ', '.join(f'{k} {fmt(v)}' for k, v in r.items() if k != 'trace')


def write_markdown(res):
    sc = res['scenarios']
    m = res['machine']
    lines = [f"Machine: {m['cores']} cores, load {' '.join(m['loadavg'])}, "
             f"{m['date']}. Timings: median (min-max) of {REPEAT} runs.", '',
             '| scenario | figure | stock | patched |',
             '| --- | --- | --- | --- |']
    tp = sc['throughput']
    for fig in ('MiB/s', 'cpu_s_per_GiB'):
        lines.append(f"| mirror 1 GiB to NBD (tmpfs) | {fig} | "
                     f"{cell(tp['stock'][fig])} | {cell(tp['patched'][fig])} |")
    ratio = tp['patched']['MiB/s']['median'] / tp['stock']['MiB/s']['median']
    lines.append(f'| throughput ratio | patched / stock | | {ratio:.3f} |')
    for key in sc:
        if key == 'throughput':
            continue
        s, p = sc[key]['stock'], sc[key]['patched']
        lines.append(f'| {key} | | {cell(s)} | {cell(p)} |')
    lines.append('')
    lines.append('Switchover stall: time from block-job-complete to '
                 'BLOCK_JOB_COMPLETED when the manager completes as soon as '
                 'the job says "ready" (stock: no limit; patched: '
                 'ready-dirty-limit 4 MiB, so the bound is 4 MiB / 8 MiB/s '
                 '= 0.5 s plus the final flush).')
    with open(os.path.join(OUT, 'results.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')


def plot(res):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    stall = res['scenarios']['switchover stall']
    fig, axes = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    colors = {'ready': '#c8e6c9', 'running': '#ffe0b2',
              'completing': '#e1bee7'}
    for ax, name in zip(axes, ('stock', 'patched')):
        r = stall[name]
        if not r:
            ax.set_title(f'{name}: not applicable')
            continue
        tr = r['trace']
        xs = [x for x, _, _ in tr]
        ax.plot(xs, [b / MiB for _, b, _ in tr], color='black')
        for (x0, _, st), (x1, _, _) in zip(tr, tr[1:]):
            ax.axvspan(x0, x1, color=colors.get(st, '#eeeeee'), lw=0)
        ax.set_title(f"{name}: stall after complete {r['stall_s']:.2f} s")
        ax.set_ylabel('MiB left to copy')
    axes[-1].set_xlabel('seconds since the guest started writing')
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    fig.legend(handles, list(colors), loc='upper right')
    fig.tight_layout()
    fig.savefig(os.path.join(OUT, 'divergence.png'), dpi=80)


if __name__ == '__main__':
    try:
        main()
    finally:
        subprocess.run(['rm', '-rf', WORK])
