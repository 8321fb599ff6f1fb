"""One source QEMU, its NBD target and one mirror job, driven step by step.

A schedule is data: {"setup": {...}, "steps": [{"op": ...}, ...]} (JSON), so
that a failure found by Hypothesis on one build can be replayed as it is on
another.  World.run(step) performs one step and then checks every invariant;
a broken invariant raises Violation.  The invariants are numbered as in
issue #12 (see README.md, "Stress testing").
"""

import os
import shutil
import socket
import subprocess
import tempfile
import time

from qemu_procs import (MiB, QmpTimeout, StorageDaemon, Vm, blkdebug_node,
                        cpu_seconds, kill_group, write_failed)

QMP_BOUND = 5.0        # every QMP command answers within this (invariant 1)
FORCE_BOUND = 5.0      # a force cancel, and quit, end within this (3)
SLACK = 5.0            # added to every bound: 2 noisy cores, -O0 builds
BUSY_CPU = 0.8         # a core's share that an idle window never reaches (4)
BUSY_WINDOW = 1.5      # shortest window over which we judge the CPU
EVENT_RATE = 200       # events per second that count as a storm (4)
SPIN_PROGRESS = 64 * MiB   # progress over a busy window that excuses it
LONGEST_WAIT = 45.0    # never wait longer for a promised end at teardown
GUEST = 'vblk/virtio-backend'

# QEMU's job state table (job.c, JobSTT); the series adds READY -> RUNNING
# for a job with a ready-dirty-limit.
EDGES = {
    'undefined': {'created'},
    'created': {'running', 'aborting', 'null'},
    'running': {'paused', 'ready', 'waiting', 'aborting'},
    'paused': {'running'},
    'ready': {'standby', 'waiting', 'aborting'},
    'standby': {'ready'},
    'waiting': {'pending', 'aborting'},
    'pending': {'aborting', 'concluded'},
    'aborting': {'aborting', 'concluded'},
    'concluded': {'null'},
    'null': set(),
}
END_EVENTS = ('BLOCK_JOB_COMPLETED', 'BLOCK_JOB_CANCELLED')

# Options of the series; dropped when replaying on a build without them.
SERIES_OPTIONS = ('retry-limit', 'retry-delay', 'stall-timeout',
                  'ready-dirty-limit')


class Violation(Exception):
    """An invariant does not hold.  `key` names the kind of violation (the
    invariant number and a word), the same for every instance of one
    defect, so that a run can tell defects apart"""

    def __init__(self, invariant, kind, detail):
        super().__init__(f'invariant {invariant} ({kind}): {detail}')
        self.invariant, self.kind, self.detail = invariant, kind, detail
        self.key = f'{invariant}-{kind}'


def has_series(build, cache={}):
    """Whether the build's blockdev-mirror knows the series' options"""
    if build not in cache:
        out = subprocess.run([f'{build}/qemu-system-x86_64', '-M', 'none',
                              '-accel', 'qtest', '-display', 'none',
                              '-qmp', 'stdio', '-nodefaults'],
                             input='{"execute":"qmp_capabilities"}\n'
                                   '{"execute":"query-qmp-schema"}\n'
                                   '{"execute":"quit"}\n',
                             capture_output=True, text=True, timeout=60)
        cache[build] = '"ready-dirty-limit"' in out.stdout
    return cache[build]


def backoff_seconds(retries, delay_ms):
    """Total backoff of `retries` failed attempts: the first waits delay_ms,
    each next one twice as long, at most 10 s"""
    # From the 15th on (delay_ms >= 1), every one is at the cap
    first = [min(delay_ms * 2 ** i, 10000) for i in range(min(retries, 15))]
    rest = (retries - len(first)) * min(delay_ms * 2 ** 15, 10000)
    return (sum(first) + rest) / 1000


def free_tcp_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class Job:
    """What the test knows about the mirror job from its events and our
    accepted commands"""

    def __init__(self, options):
        self.options = dict(options)
        self.status = 'undefined'
        self.readies = 0            # transitions into READY from RUNNING
        self.ready_events = 0
        self.ends = []              # end events
        self.ready_limit = options.get('ready-dirty-limit') is not None
        self.was_ready = False
        self.completed_at = None    # block-job-complete accepted
        self.cancel = None          # (force, time, deadline) once accepted
        self.user_paused = False

    @property
    def ended(self):
        return bool(self.ends)


class World:
    """The processes of one schedule and the checks after every step"""

    def __init__(self, build, work_root, setup, log=None, claims=None):
        self.build, self.setup = build, setup
        self.series = has_series(build)
        # Hold the build to the series' promises (bounds on cancel and quit
        # with a target that does not answer); on stock only to learn
        # whether stock fails there too
        self.claims = self.series if claims is None else claims
        self.work = tempfile.mkdtemp(prefix='st-', dir=work_root)
        self.log = log or (lambda msg: None)
        self.vm = self.target = None
        self.job = None
        self.vm_running = True
        self.source_faults = False
        self.source_node_gen = 0
        self.throttle_bps = 0
        self.current_op = 'setup'
        self._start()

    # --- setting up -----------------------------------------------------

    def path(self, name):
        return os.path.join(self.work, name)

    def _qemu_io_file(self, fmt, img, commands):
        args = [f'{self.build}/qemu-io', '-f', fmt]
        for c in commands:
            args += ['-c', c]
        subprocess.run(args + [img], check=True, stdout=subprocess.DEVNULL,
                       timeout=60)

    def _start(self):
        s = self.setup
        size = s['size_mib'] * MiB
        fmt = s['format']
        self.src_img = self.path(f'src.{fmt}')
        self.tgt_img = self.path('tgt.raw')
        subprocess.run([f'{self.build}/qemu-img', 'create', '-q', '-f', fmt,
                        self.src_img, str(size)], check=True, timeout=60)
        subprocess.run([f'{self.build}/qemu-img', 'create', '-q', '-f', 'raw',
                        self.tgt_img, str(size)], check=True, timeout=60)
        # The source's first contents: data and zero extents, so that the
        # copy meets both data and write-zeroes requests
        units = size // (64 * 1024)
        cmds = [f'write {"-z" if kind == "zero" else f"-P {pat}"} '
                f'{off * 64 * 1024} {min(length, units - off) * 64 * 1024}'
                for kind, off, length, pat in s['layout'] if off < units]
        if cmds:
            self._qemu_io_file(fmt, self.src_img, cmds)
        addr = (self.path('nbd') if s['transport'] == 'unix'
                else ('127.0.0.1', free_tcp_port()))
        self.target = StorageDaemon(self.build, self.tgt_img, addr,
                                    self.path('qsd'), self.path('qsd.log'))
        extra = ['-object', 'iothread,id=io0'] if s['iothread'] else []
        self.vm = Vm(self.build, self.work, self.path('qemu.log'), extra,
                     timeout=QMP_BOUND)
        self.vm.ok('blockdev-add', {'node-name': 'sfile', 'driver': 'file',
                                    'filename': self.src_img})
        self.vm.ok('blockdev-add', {'node-name': 'sdbg0',
                                    'driver': 'blkdebug', 'image': 'sfile'})
        self.vm.ok('blockdev-add', {'node-name': 'src', 'driver': fmt,
                                    'file': 'sdbg0'})
        dev = {'driver': 'virtio-blk-pci', 'id': 'vblk', 'drive': 'src'}
        if s['iothread']:
            dev['iothread'] = 'io0'
        self.vm.ok('device_add', dev)
        self.vm.ok('blockdev-add', {
            'node-name': 'tgt', 'driver': 'raw',
            'file': {'driver': 'nbd', 'export': 't',
                     'server': self.target.nbd_client_addr()}})
        if s.get('throttle'):
            self.throttle({'bps': s['throttle']})
        for f in s.get('faults', []):
            self.fault(f)
        self.mirror(s['mirror'])
        self.check()

    def mirror(self, options):
        args = {'job-id': 'm', 'device': 'src', 'target': 'tgt',
                'sync': 'full'}
        args.update(self.supported(options))
        self.job = Job(args)
        r = self.vm.cmd('blockdev-mirror', args)
        if 'error' in r:
            raise RuntimeError(f'blockdev-mirror refused {args}: '
                               f'{r["error"]["desc"]}')

    def supported(self, options):
        """options without the series' ones on a build without the series"""
        if self.series:
            return dict(options)
        return {k: v for k, v in options.items() if k not in SERIES_OPTIONS}

    # --- steps ----------------------------------------------------------

    def run(self, step):
        """Perform one step (a dict with 'op'), then check the invariants"""
        self.log(f'  step {step} (job {self.job.status})')
        self.current_op = step['op']
        try:
            getattr(self, step['op'].replace('-', '_'))(step)
            self.check()
        except QmpTimeout as e:
            self.hung(f'{step["op"]}: {e}')

    def write(self, step):
        if step.get('zero'):
            cmd = f'write -z {step["offset"]} {step["length"]}'
        else:
            cmd = f'write -P {step["pattern"]} {step["offset"]} ' \
                  f'{step["length"]}'
        out = self.vm.qemu_io(GUEST, cmd)
        # A read error injected on the source may fail a qcow2 write that
        # has to read (copy on write, metadata): the source's own failure
        if write_failed(out) and not self.source_faults:
            raise Violation(4, 'guest-write-failed', f'{cmd}: {out.strip()}')

    def target_ctl(self, step):
        t, action = self.target, step['action']
        if action == 'kill' and t.alive():
            t.kill()
        elif action == 'stop' and t.alive() and not t.stopped:
            t.stop()
        elif action == 'cont' and t.alive() and t.stopped:
            t.cont()
        elif action == 'restart' and not t.alive():
            t.start()
            self.throttle_bps = 0

    def target_usable(self):
        return self.target.alive() and not self.target.stopped

    def fault(self, step):
        """Inject errors (or none: 'io' is None) on the target or source"""
        rules = []
        if step.get('io'):
            event, iotype = {'write': ('pwritev', 'write'),
                             'zero': ('pwritev_zero', 'write-zeroes'),
                             'flush': ('flush_to_os', 'flush'),
                             'read': ('read_aio', 'read')}[step['io']]
            rules = [{'event': event, 'iotype': iotype,
                      'errno': step['errno'], 'once': step['once'],
                      'immediately': True}]
        if not self.target_usable():
            # Reopening the source drains it, and so the job's requests to
            # the target: only while the target answers
            return
        if step['side'] == 'target':
            self.target_qmp(self.target.set_faults, rules)
            return
        try:
            self.set_source_faults(rules)
        except RuntimeError as e:     # refused: an answer, not a defect
            self.log(f'  source faults: {e}')

    def target_qmp(self, fn, *args):
        """A command to the target daemon: its trouble is not QEMU's, so
        it is logged, not raised"""
        try:
            fn(*args)
            return True
        except (QmpTimeout, RuntimeError) as e:
            self.log(f'  target daemon: {e}')
            return False

    def set_source_faults(self, rules):
        """Swap the source's blkdebug node (blkdebug ignores new rules on
        reopen) for one with these rules"""
        old, new = f'sdbg{self.source_node_gen}', \
            f'sdbg{self.source_node_gen + 1}'
        self.vm.ok('blockdev-add', blkdebug_node(new, 'sfile', rules))
        self.vm.ok('blockdev-reopen', {'options': [{
            'driver': self.setup['format'], 'node-name': 'src',
            'file': new}]})
        self.source_node_gen += 1
        self.vm.ok('blockdev-del', {'node-name': old})
        self.source_faults = bool(rules)

    def throttle(self, step):
        if self.target_usable() and \
                self.target_qmp(self.target.throttle, step['bps']):
            self.throttle_bps = step['bps']

    def job_cmd(self, name, args):
        """A job command; its reply (errors are answers, too)"""
        return self.vm.cmd(name, args)

    def pause(self, step):
        if 'error' not in self.job_cmd('job-pause', {'id': 'm'}):
            self.job.user_paused = True

    def resume(self, step):
        if 'error' not in self.job_cmd('job-resume', {'id': 'm'}):
            self.job.user_paused = False

    def cancel(self, step):
        force = step['force']
        before = self.query_job()
        r = self.job_cmd('block-job-cancel', {'device': 'm', 'force': force})
        if 'error' in r or self.job.ended or self.job.cancel:
            return
        bound = self.cancel_bound(force, before)
        now = time.monotonic()
        self.job.cancel = (force, now, None if bound is None else now + bound)

    def cancel_bound(self, force, job):
        """Seconds within which an accepted cancel must end the job, as the
        job's settings promise; None where nothing is promised"""
        if force:
            return FORCE_BOUND + SLACK
        left = job['len'] - job['offset'] if job else 0
        copy = left / self.throttle_bps if self.throttle_bps else 0
        if not self.claims:
            # Stock QEMU promises nothing on a target that does not answer
            return None if not self.target_usable() else SLACK + copy
        now = self.query_job() or {}     # stock: the series' defaults
        retries = now.get('retry-limit', 3)
        delay = now.get('retry-delay', 100)
        stall = now.get('stall-timeout', 10)
        if stall == 0 and self.target.stopped:
            return None
        # Each attempt may wait for the stall timeout, then back off
        return (SLACK + copy + backoff_seconds(retries, delay)
                + (retries + 1) * stall)

    def complete(self, step):
        if 'error' not in self.job_cmd('block-job-complete', {'device': 'm'}):
            if self.job.completed_at is None:
                self.job.completed_at = time.monotonic()

    def finalize(self, step):
        self.job_cmd('job-finalize', {'id': 'm'})

    def dismiss(self, step):
        self.job_cmd('job-dismiss', {'id': 'm'})

    def change(self, step):
        """block-job-change with one field (valid or not): the reply may
        be an error, but the answer must come"""
        field, value = step['field'], step['value']
        if field in SERIES_OPTIONS and not self.series:
            return
        r = self.job_cmd('block-job-change', {'id': 'm', 'type': 'mirror',
                                              field: value})
        if 'error' not in r and field == 'ready-dirty-limit':
            self.job.ready_limit = value is not None

    def query(self, step):
        self.query_job()

    def vm_ctl(self, step):
        if step['action'] == 'stop' and self.vm_running:
            self.vm.ok('stop')
            self.vm_running = False
        elif step['action'] == 'cont' and not self.vm_running:
            self.vm.ok('cont')
            self.vm_running = True

    def wait(self, step):
        """Watch for up to `seconds`, until the job's status changes; over
        a long enough window QEMU must not spin nor storm events"""
        seconds = step['seconds']
        if self.job.status in ('concluded', 'null'):
            # Only a dismiss of ours changes it: one window for the CPU
            seconds = min(seconds, BUSY_WINDOW)
        start, n_events = time.monotonic(), len(self.vm.q.events)
        job0 = self.query_job()
        cpu0 = cpu_seconds(self.vm.proc.pid)
        self.vm.q.wait_event(['JOB_STATUS_CHANGE'], seconds, since=n_events)
        window = time.monotonic() - start
        cpu = cpu_seconds(self.vm.proc.pid) - cpu0
        job1 = self.query_job()
        self.vm.q.pull_events()
        if window < BUSY_WINDOW:
            return
        events = len(self.vm.q.events) - n_events
        if events / window > EVENT_RATE:
            raise Violation(4, 'event-storm',
                            f'{events} events in {window:.1f} s')
        progress = (job1['offset'] - job0['offset']) if job0 and job1 else 0
        if cpu / window > BUSY_CPU and progress < SPIN_PROGRESS:
            raise Violation(4, 'busy-loop',
                            f'QEMU used {cpu:.1f} s CPU in {window:.1f} s '
                            f'while the job copied {progress} bytes')

    # --- invariants -----------------------------------------------------

    def hung(self, what):
        """QEMU did not answer: say why if it is gone, then kill it"""
        self.check_alive()
        cpu0 = cpu_seconds(self.vm.proc.pid)
        time.sleep(1)
        spin = cpu_seconds(self.vm.proc.pid) - cpu0
        self.vm.kill()
        # A QEMU that spins (livelock) and one that waits (blocked on the
        # target) are different defects
        raise Violation(1, 'qmp-timeout-spinning' if spin > BUSY_CPU else
                        'qmp-timeout', f'{what}; QEMU used {spin:.1f} s CPU '
                        'in the next 1 s')

    def check_alive(self):
        with open(self.path('qemu.log'), errors='replace') as f:
            log = f.read()
        for bad in ('Assertion', 'assertion failed', 'Aborted',
                    'core dumped', 'Segmentation'):
            if bad in log:
                raise Violation(1, 'assertion', log.strip()[-500:])
        if not self.vm.alive():
            raise Violation(1, 'died', f'QEMU exited with status '
                            f'{self.vm.proc.returncode}: {log[-300:]}')

    def query_job(self):
        try:
            jobs = self.vm.ok('query-block-jobs')
        except QmpTimeout as e:
            self.hung(str(e))
        return jobs[0] if jobs else None

    def guest_node(self):
        try:
            blocks = self.vm.ok('query-block')
        except QmpTimeout as e:
            self.hung(str(e))
        for b in blocks:
            if b.get('qdev', '').startswith('/machine/peripheral/vblk'):
                return b.get('inserted', {}).get('node-name')
        raise Violation(5, 'no-device', 'query-block lost the guest device')

    def check(self):
        """Every invariant, after a step"""
        self.check_alive()
        self.query_job()            # invariant 1: QMP answers
        self.vm.q.pull_events()
        self.check_events()
        self.check_cancel_bound()
        self.check_authority()

    def check_events(self):
        j = self.job
        for ev in self.vm.q.events[getattr(self, '_seen', 0):]:
            name, data = ev['event'], ev.get('data', {})
            if name == 'JOB_STATUS_CHANGE' and data.get('id') == 'm':
                new, old = data['status'], j.status
                legal = EDGES[old] | ({'running'} if old == 'ready' and
                                      j.ready_limit and self.series else set())
                if new not in legal:
                    raise Violation(2, 'illegal-edge',
                                    f'{old} -> {new} (ready-dirty-limit '
                                    f'{"set" if j.ready_limit else "unset"})')
                if new == 'ready' and old == 'running':
                    j.readies += 1
                    j.was_ready = True
                if new == 'null' and not j.ends:
                    raise Violation(2, 'no-end-event',
                                    'job reached null without an end event')
                j.status = new
            elif name == 'BLOCK_JOB_READY' and data.get('device') == 'm':
                j.ready_events += 1
                if j.status != 'ready':
                    raise Violation(2, 'ready-event-mismatch',
                                    f'BLOCK_JOB_READY while {j.status}')
            elif name in END_EVENTS and data.get('device') == 'm':
                j.ends.append(ev)
                if len(j.ends) > 1:
                    raise Violation(2, 'two-end-events',
                                    f'{[e["event"] for e in j.ends]}')
                self.on_end(ev)
        self._seen = len(self.vm.q.events)
        if j.ready_events != j.readies:
            raise Violation(2, 'ready-event-mismatch',
                            f'{j.ready_events} BLOCK_JOB_READY events for '
                            f'{j.readies} transitions into ready')

    def check_cancel_bound(self):
        j = self.job
        # A job that waits in PENDING for our job-finalize is not late
        waits_for_us = (j.status == 'pending' and
                        not j.options.get('auto-finalize', True))
        if j.cancel and not j.ended and not waits_for_us:
            force, at, deadline = j.cancel
            if deadline is not None and time.monotonic() > deadline:
                raise Violation(3, 'force-cancel-late' if force else
                                'cancel-late',
                                f'{"force" if force else "soft"} cancel '
                                f'accepted {time.monotonic() - at:.1f} s ago, '
                                f'bound {deadline - at:.1f} s, job still '
                                f'{j.status}')

    def expected_node(self):
        """'src' or 'tgt' where the guest must be, None if either may be"""
        j = self.job
        if not j.ended:
            return None if j.status in ('pending', 'waiting',
                                        'concluded') else 'src'
        ev = j.ends[0]
        if j.cancel:
            return 'src'       # an accepted cancel never pivots
        if ev['event'] == 'BLOCK_JOB_COMPLETED' and 'error' not in \
                ev['data'] and j.completed_at is not None:
            return 'tgt'
        return 'src'

    def check_authority(self):
        node = self.guest_node()
        want = self.expected_node()
        if want is None:
            if node not in ('src', 'tgt'):
                raise Violation(5, 'unknown-node', f'guest on {node}')
            return
        if node != want:
            j = self.job
            how = ('after an accepted ' +
                   ('force' if j.cancel[0] else 'soft') + ' cancel'
                   if j.cancel else 'after a completed pivot'
                   if want == 'tgt' else 'after the job ended')
            raise Violation(5, 'wrong-node',
                            f'guest on {node}, not {want}, {how} (ended with '
                            f'{j.ends[0]["event"] if j.ends else "-"})')

    def on_end(self, ev):
        """Invariant 6: a job that completed (pivot, or a soft cancel after
        READY) left the target identical to the source"""
        j = self.job
        if ev['event'] != 'BLOCK_JOB_COMPLETED' or 'error' in ev['data']:
            return
        # The guest's writes must have stopped: a write in this very step
        # may have gone to the target alone after the pivot
        if not j.was_ready or self.current_op == 'write':
            return
        self.compare_images('job completed')

    def compare_images(self, why):
        fmt = self.setup['format']
        # QEMU may still hold the source's new qcow2 metadata in its cache
        self.vm.ok('human-monitor-command',
                   {'command-line': 'qemu-io src "flush"'})
        r = subprocess.run([f'{self.build}/qemu-img', 'compare', '-f', fmt,
                            '-F', 'raw', '-U', self.src_img, self.tgt_img],
                           capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise Violation(6, 'data-differs', f'{why}: qemu-img compare: '
                            f'{(r.stdout + r.stderr).strip()}')

    # --- the end --------------------------------------------------------

    def finish(self):
        """The end of a schedule: let a promised cancel end, then quit"""
        j = self.job
        if j.cancel and not j.ended and j.cancel[2] is not None:
            left = min(j.cancel[2] - time.monotonic(), LONGEST_WAIT)
            self.vm.q.wait_event(END_EVENTS, max(left, 0))
            self.check()
        bound = FORCE_BOUND + SLACK
        took = self.vm.quit(bound)
        if took is None and (self.claims or self.target_usable()):
            raise Violation(3, 'quit-late', f'quit did not end QEMU within '
                            f'{bound:.0f} s (target '
                            f'{"stopped" if self.target.stopped else "alive" if self.target.alive() else "dead"})')
        self.check_alive_after_quit()

    def check_alive_after_quit(self):
        with open(self.path('qemu.log'), errors='replace') as f:
            log = f.read()
        if 'Assertion' in log or 'assertion failed' in log:
            raise Violation(1, 'assertion', log.strip()[-500:])

    def close(self):
        """Kill everything, remove every file"""
        if self.vm:
            self.vm.kill()
        if self.target:
            kill_group(self.target.proc)
        shutil.rmtree(self.work, ignore_errors=True)
