"""One source QEMU, its NBD target and one mirror job, driven step by step.

A schedule is data: {"setup": {...}, "steps": [{"op": ...}, ...]} (JSON), so
that a failure found by Hypothesis on one build can be replayed as it is on
another.  World.run(step) performs one step and then checks every invariant;
a broken invariant raises Violation.  A command that waits where nothing
bounds the wait raises Unbounded: the schedule ends without a verdict.  The
invariants are numbered as in issue #12 (see README.md, "Stress testing").
"""

import collections
import itertools
import math
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time

import qemu_procs
# start_process() gives QEMU and the daemon PR_SET_PDEATHSIG: a tester
# killed with SIGKILL leaves none behind
from qemu_procs import (LogTail, MiB, QmpTimeout, StorageDaemon, Vm,
                        blkdebug_node, cpu_seconds, kill_group,
                        qemu_io_command, qemu_io_failures)

# --- What the series promises, in seconds ---------------------------------
# Each is one of QEMU's own constants (build/qemu with the series applied);
# model_check.py compares them with the source.  Stock QEMU is held to the
# same bounds only to learn whether it breaks them too.

# block/nbd.c NBD_CANCEL_GRACE_NS: bdrv_cancel_unanswered() on NBD waits this
# long for replies, then shuts a silent server's connection down
NBD_GRACE = 1.0
# block/mirror.c MIRROR_ACTIVE_WRITE_TIMEOUT_DEFAULT: a guest write that
# write-blocking mode copies waits this long at most for the target (unless
# the user set stall-timeout)
ACTIVE_WRITE_TIMEOUT = 5
# MIRROR_STALL_TIMEOUT_DRAINED: a drain of the job's nodes (stop, a
# switchover, a graph change) waits this long at most for the target
DRAINED_STALL_TIMEOUT = 10
# MIRROR_STALL_TIMEOUT_CANCELLED: the stall timeout of a cancelled job
CANCELLED_STALL_TIMEOUT = 10
# MIRROR_STALL_TIMEOUT_QUIT: the stall timeout once QEMU quits
QUIT_STALL_TIMEOUT = 1
# block/nbd.c NBD_QUIT_GRACE_NS: once QEMU quits, an NBD server that no
# running job watches may go this long without a reply
NBD_QUIT_GRACE = 10.0
# MIRROR_STALL_CHECK_NS: the stall timer looks this often, so a stall is
# noticed up to this late
STALL_CHECK = 0.25
# include/block/blockjob.h: retries of a cancelled job, the first backoff,
# and the cap of the backoff: block_job_retry_backoff_ns() doubles the
# delay up to MAX(retry-delay, BLOCK_JOB_RETRY_BACKOFF_CAP)
RETRY_LIMIT_CANCELLED = 3
RETRY_DELAY_DEFAULT_MS = 100
BACKOFF_CAP_MS = 10000

# Added to every bound: -O0 builds on 2 shared, noisy cores.  Also all the
# time a command gets that waits for no I/O on the target.
SLACK = 5.0
# A wait that nothing bounds (a frozen target with stall-timeout 0, a guest
# on a frozen target after the pivot), and how long a command that may wait
# so gets before the schedule ends as Unbounded
NO_BOUND = math.inf
UNBOUNDED_WAIT = 10.0

BUSY_CPU = 0.8         # a core's share that an idle window never reaches (4)
BUSY_WINDOW = 1.5      # shortest window over which we judge the CPU
EVENT_RATE = 200       # events per second that count as a storm (4)
# A busy window is excused if the job copied at least this share of the
# image meanwhile: a busy loop copies nothing, and a real copy of a few MiB
# takes a fraction of a second even at -O0
SPIN_SHARE = 0.25
LONGEST_WAIT = 45.0    # never wait longer for a promised end at teardown
# How long BLOCK_JOB_READY may trail its READY status change.  QEMU sends
# both in one call (job_transition_to_ready()); on 2 loaded cores the second
# was once seen to reach us more than 1 s after the first
READY_EVENT_DELAY = SLACK
GUEST = 'vblk/virtio-backend'

# Commands that drain every node, and so wait for the job's requests to the
# target: a graph change takes the graph lock (bdrv_graph_wrlock() drains
# all nodes), the end of a job replaces nodes (mirror_exit_common()), and
# stop drains and flushes everything (so does quit, see quit_wait())
DRAINING = {'blockdev-add', 'blockdev-reopen', 'blockdev-del',
            'blockdev-mirror', 'stop', 'block-job-cancel',
            'block-job-complete', 'job-finalize', 'job-dismiss'}

# QEMU's job state table (job.c JobSTT), without the series' READY ->
# RUNNING, which is legal only for a job with a ready-dirty-limit
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
SERIES_EDGES = {'ready': {'running'}}

# QEMU's verb table (job.c JobVerbTable): the statuses that accept a verb
_LIVE = {'created', 'running', 'paused', 'ready', 'standby'}
VERB_TABLE = {
    'cancel': _LIVE | {'waiting', 'pending'},
    'pause': set(_LIVE),
    'resume': set(_LIVE),
    'set-speed': set(_LIVE),
    'complete': {'ready', 'standby'},
    'finalize': {'pending'},
    'dismiss': {'concluded'},
    'change': set(_LIVE),
}
# The statuses in which mirror_run() runs, and with it the stall timer
RUN_PHASE = _LIVE

END_EVENTS = ('BLOCK_JOB_COMPLETED', 'BLOCK_JOB_CANCELLED')

# Options of the series; dropped when replaying on a build without them.
SERIES_OPTIONS = ('retry-limit', 'retry-delay', 'stall-timeout',
                  'ready-dirty-limit')

# Lines of a crash in QEMU's or qemu-storage-daemon's log ("Unexpected
# error in": an &error_abort, util/error.c)
CRASH_MARKERS = ('Assertion', 'assertion failed', 'Aborted', 'core dumped',
                 'Segmentation', 'Unexpected error in')
# The steps World.run() performs: op -> method ('quit' is World.finish())
STEP_OPS = {
    'write': 'write', 'target-ctl': 'target_ctl', 'fault': 'fault',
    'throttle': 'throttle', 'cancel': 'cancel', 'complete': 'complete',
    'pause': 'pause', 'resume': 'resume', 'finalize': 'finalize',
    'dismiss': 'dismiss', 'change': 'change', 'query': 'query',
    'vm-ctl': 'vm_ctl', 'wait': 'wait',
}


# How often each check was made and each situation met, over all the worlds
# of a run (stress.py reports it): a check that never ran proves nothing
COVERAGE = collections.Counter()


def covered(what):
    COVERAGE[what] += 1


# qemu-io's report of a write that ended well (write and aio_write alike)
QEMU_IO_WROTE = re.compile(r'^wrote (\d+)/\d+ bytes at offset (\d+)$', re.M)


class AioWrite:
    """A guest aio_write that has not ended yet, and by when it must (it
    may wait for the target as long as a write would: World.write_wait())"""

    def __init__(self, offset, length, now, wait):
        self.offset, self.length, self.issued_at = offset, length, now
        self.deadline = now + wait + SLACK

    def renew(self, now, wait):
        """What may delay it changed: see renewed_deadline()"""
        self.deadline = renewed_deadline(self.deadline, now, wait)


def renewed_deadline(deadline, now, bound):
    """A deadline once the situation changed to promise `bound` seconds
    from now: the later of the two; NO_BOUND if nothing is promised now;
    from now if nothing was promised before (a frozen target thawed, a
    stall-timeout set)"""
    if bound == NO_BOUND:
        return NO_BOUND
    if deadline == NO_BOUND:
        return now + bound + SLACK
    return max(deadline, now + bound + SLACK)


def slug(text):
    """text as a part of a file name"""
    return re.sub(r'[^A-Za-z0-9.]+', '-', text).strip('-')[:80]


class Violation(Exception):
    """An invariant does not hold.  `key` names the kind of violation (the
    invariant number and a word); `where` says in which situation (the
    step, the job's status, the edge...), so that `signature`, both
    together, tells apart the violations of one kind that are different
    defects, and is the same every time one defect shows"""

    def __init__(self, invariant, kind, detail, where=None):
        super().__init__(f'invariant {invariant} ({kind}): {detail}')
        self.invariant, self.kind, self.detail = invariant, kind, detail
        self.key = f'{invariant}-{kind}'
        self.where = where

    @property
    def signature(self):
        return f'{self.key}@{slug(self.where or "?")}'


class Unbounded(Exception):
    """A command took longer than UNBOUNDED_WAIT where neither the series
    nor stock QEMU bounds its wait (stall-timeout 0 on a frozen target, a
    guest on a frozen target after the pivot, a flush of a frozen target
    after the job): QEMU is killed and the schedule ends, without a
    verdict.  These are documented gaps, the same on stock."""

    def __init__(self, what, where):
        super().__init__(f'no bound: {what}')
        self.where = where
        self.signature = f'unbounded@{slug(where)}'


class ScheduleError(ValueError):
    """A schedule that cannot be replayed (an unknown step, say)"""


def check_schedule(schedule):
    """ScheduleError unless every step is one World performs"""
    steps = schedule.get('steps', [])
    for i, step in enumerate(steps):
        op = step.get('op')
        if op == 'quit' and i == len(steps) - 1:
            continue
        if op not in STEP_OPS:
            raise ScheduleError(
                f'step {i}: unknown op {op!r} (known: '
                f'{", ".join(sorted(STEP_OPS))}, and quit as the last)')


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
    """Total backoff of `retries` failed attempts, as blockjob.c's
    block_job_retry_backoff_ns(): the n-th waits delay_ms * 2^(n-1), at
    most MAX(delay_ms, BACKOFF_CAP_MS)"""
    cap = max(delay_ms, BACKOFF_CAP_MS)
    total, wait = 0, delay_ms
    for n in range(retries):
        if wait >= cap:         # all the others wait the cap
            return (total + (retries - n) * cap) / 1000
        total += wait
        wait *= 2
    return total / 1000


def free_tcp_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def crash_line(text):
    """The first line of text that shows a crash, or None"""
    for line in text.splitlines():
        if any(marker in line for marker in CRASH_MARKERS):
            return line.strip()
    return None


class CancelPromise:
    """An accepted cancel, and by when the job must have ended (NO_BOUND:
    nothing is promised, e.g. a frozen target with stall-timeout 0).
    What the job's settings promise is a number of seconds from now; the
    deadline follows the changes of the job and its target (renew), the
    guest's writes that a soft cancel has to copy too (extend), a force
    cancel after a soft one (escalate), and the user's pauses."""

    def __init__(self, force, now, bound, where):
        self.force, self.accepted_at, self.where = force, now, where
        self.deadline = now + bound + SLACK
        self.paused_since = None

    def renew(self, now, bound):
        """The job's settings or its target changed: see
        renewed_deadline()"""
        self.deadline = renewed_deadline(self.deadline, now, bound)

    def extend(self, seconds):
        """More to copy: a soft cancel finishes the copy first"""
        if not self.force:
            self.deadline += seconds

    def escalate(self, now, bound, where):
        """A force cancel after a soft one: the force bound holds from now"""
        self.force, self.where = True, where
        self.paused_since = None    # a force cancel resumes the job
        self.deadline = now + bound + SLACK

    def pause(self, now):
        # job_pause_point() does not pause a force-cancelled job
        if not self.force and self.paused_since is None:
            self.paused_since = now

    def resume(self, now):
        if self.paused_since is not None:
            self.deadline += now - self.paused_since
            self.paused_since = None

    def overdue(self, now):
        return self.paused_since is None and now > self.deadline


class Job:
    """What the test knows about the mirror job from its events and our
    accepted commands"""

    def __init__(self, options):
        self.options = dict(options)
        self.status = 'undefined'
        self.readies = 0            # transitions into READY from RUNNING
        self.ready_events = 0
        self.ends = []              # end events
        self.was_ready = False
        self.completed_at = None    # block-job-complete accepted
        self.cancel = None          # a CancelPromise once one was accepted
        # block-job-complete, or a soft cancel (of a READY job), accepted:
        # mirror_run() ends by draining the source, and the source stays
        # drained until the job's end (mirror_exit_common()), which with
        # auto-finalize off waits for our job-finalize
        self.finishing = False
        self.user_paused = False
        # The settings in effect: the user's, or None for QEMU's default
        self.copy_mode = options.get('copy-mode', 'background')
        self.retry_limit = options.get('retry-limit')
        self.retry_delay = options.get('retry-delay')
        self.stall_timeout = options.get('stall-timeout')
        self.ready_limit = options.get('ready-dirty-limit') is not None

    @property
    def ended(self):
        return bool(self.ends)

    @property
    def copying(self):
        """mirror_run() still runs, and with it the stall timer"""
        return not self.ended and self.status in RUN_PHASE

    def changed(self, field, value):
        """block-job-change accepted field: value"""
        if field == 'ready-dirty-limit':
            self.ready_limit = value is not None
        else:
            setattr(self, field.replace('-', '_'), value)


class World:
    """The processes of one schedule and the checks after every step"""

    def __init__(self, build, work_root, setup, log=None, claims=None):
        self.build, self.setup = build, setup
        self.series = has_series(build)
        # Hold the build to the series' promises (bounds on cancel and quit
        # with a target that does not answer); on stock only to learn
        # whether stock fails there too
        self.claims = self.series if claims is None else claims
        self.size = setup['size_mib'] * MiB
        self.work = tempfile.mkdtemp(prefix='st-', dir=work_root)
        self.log = log or (lambda msg: None)
        self.vm = self.target = None
        self.source_faults = False
        self.aio_writes = []        # AioWrite: the guest's, not ended yet
        self.aio_ended_in_step = []  # and those that ended in this step
        self.job = None
        self.vm_running = True
        self.source_node = 'sdbg0'
        self.node_serial = itertools.count(1)
        # The target was killed or given faults: a guest that runs on it
        # after the pivot may see its writes fail
        self.target_trouble = False
        self.target_killed = False
        self.throttle_bps = 0
        # The slowest limit the target's throttle group had since it
        # started: requests it queued wait for a timer armed at that rate,
        # which a new limit does not re-arm (block/throttle-groups.c)
        self.slowest_bps = 0
        self.current_op, self.current_step = 'setup', None
        self.qemu_log = LogTail(self.path('qemu.log'))
        self.qsd_log = LogTail(self.path('qsd.log'))
        self._seen = 0              # events checked so far
        self.procs_before = set(qemu_procs.STARTED)
        try:
            self._start()
        except BaseException:
            self.close()            # what a failed setup started, too
            raise

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
        fmt = s['format']
        self.src_img = self.path(f'src.{fmt}')
        self.tgt_img = self.path('tgt.raw')
        subprocess.run([f'{self.build}/qemu-img', 'create', '-q', '-f', fmt,
                        self.src_img, str(self.size)], check=True, timeout=60)
        subprocess.run([f'{self.build}/qemu-img', 'create', '-q', '-f', 'raw',
                        self.tgt_img, str(self.size)], check=True, timeout=60)
        # The source's first contents: data and zero extents, so that the
        # copy meets both data and write-zeroes requests
        units = self.size // (64 * 1024)
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
                     timeout=SLACK)
        self.qmp_ok('blockdev-add', {'node-name': 'sfile', 'driver': 'file',
                                     'filename': self.src_img})
        self.qmp_ok('blockdev-add', {'node-name': 'sdbg0',
                                     'driver': 'blkdebug', 'image': 'sfile'})
        self.qmp_ok('blockdev-add', {'node-name': 'src', 'driver': fmt,
                                     'file': 'sdbg0'})
        dev = {'driver': 'virtio-blk-pci', 'id': 'vblk', 'drive': 'src'}
        if s['iothread']:
            dev['iothread'] = 'io0'
        self.qmp_ok('device_add', dev)
        self.qmp_ok('blockdev-add', {
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
        r = self.qmp('blockdev-mirror', args)
        if 'error' in r:
            raise RuntimeError(f'blockdev-mirror refused {args}: '
                               f'{r["error"]["desc"]}')

    def supported(self, options):
        """options without the series' ones on a build without the series"""
        if self.series:
            return dict(options)
        return {k: v for k, v in options.items() if k not in SERIES_OPTIONS}

    # --- talking to QEMU, each command within its bound (invariant 1) ---

    def qmp(self, name, args=None, wait=None):
        """A command and its reply (errors are answers, too).  It gets
        SLACK plus the seconds the series lets it wait for the target:
        `wait`, else drain_wait() for a command that drains, else none.
        Where nothing bounds the wait (NO_BOUND), it gets UNBOUNDED_WAIT,
        then the schedule ends (Unbounded)."""
        if wait is None:
            wait = self.drain_wait(flush=name == 'stop') \
                if name in DRAINING else 0.0
        bound = UNBOUNDED_WAIT if wait == NO_BOUND else wait + SLACK
        try:
            return self.vm.cmd(name, args, timeout=bound)
        except QmpTimeout as e:
            where = f'{name} in {self.job_status()}, target ' \
                    f'{self.target_state()}'
            if wait == NO_BOUND:
                self.vm.kill()
                raise Unbounded(f'{self.current_op}: {e}', where) from e
            self.hung(f'{e}; bound {bound:.1f} s', where)

    def qmp_ok(self, name, args=None, wait=None):
        """The command's return value; RuntimeError if it failed"""
        r = self.qmp(name, args, wait)
        if 'error' in r:
            raise RuntimeError(f'{name}: {r["error"]["desc"]}')
        return r['return']

    def job_status(self):
        return self.job.status if self.job else 'no job yet'

    def target_state(self):
        t = self.target
        return ('dead' if not t.alive() else 'frozen' if t.stopped else
                'throttled' if self.throttle_bps else 'alive')

    def target_frozen(self):
        return self.target.alive() and self.target.stopped

    def target_usable(self):
        return self.target.alive() and not self.target.stopped

    def transfer_seconds(self, nbytes):
        """What the throttled target takes for nbytes (write-zeroes count
        as bytes, too), at the slowest limit it had: a request queued
        before the limit was raised or lifted keeps its wait"""
        return nbytes / self.slowest_bps if self.slowest_bps else 0.0

    def stall_timeout(self, draining=False):
        """mirror_stall_timeout(): the one the user set, else 10 s once
        cancelled or while drained, else 0 (none)"""
        j = self.job
        if j.stall_timeout is not None:
            return j.stall_timeout
        if j.cancel:
            return CANCELLED_STALL_TIMEOUT
        return DRAINED_STALL_TIMEOUT if draining else 0

    def stall_wait(self, stall):
        """Seconds a request of the job waits for a frozen target before
        the stall timer cancels it and NBD gives up on it"""
        return stall + STALL_CHECK + NBD_GRACE if stall else NO_BOUND

    def drain_wait(self, flush=False):
        """Seconds a drain of all nodes (and, with flush, a flush of all,
        as stop does) may wait for the target"""
        if not self.target.alive():
            return 0.0              # requests to a dead server fail at once
        if self.guest_writes_on_frozen_target():
            return NO_BOUND
        if not self.target.stopped:
            # What is in flight: at most the whole image (write-zeroes are
            # not limited by the job's buffer), and the guest's aio writes
            return self.transfer_seconds(self.size + self.aio_bytes())
        if self.job.copying:
            # The job's requests wait for its stall timeout (0: forever),
            # the others (the flush of all nodes) for
            # mirror_foreign_timeout(): the same while drained, the
            # stall-timeout the user set, else DRAINED_STALL_TIMEOUT
            return self.stall_wait(self.stall_timeout(draining=True))
        # No job to give up on the frozen target: the flush of its node
        # waits for it as long as it takes (stock too)
        return NO_BOUND if flush else 0.0

    def write_wait(self, length):
        """Seconds a guest write of length bytes may wait for the target"""
        if self.guest_node() == 'tgt':
            # After the pivot the guest writes to the target, with no job
            # and no bound in between
            return NO_BOUND if self.target_frozen() else \
                self.transfer_seconds(length)
        j = self.job
        if j.finishing and not j.ended:
            # The write may wait for the job's end; without auto-finalize
            # that is our job-finalize, which the monitor cannot take
            # while it runs this very write (stock too).  A forced cancel
            # ends the job without one
            forced = j.cancel and j.cancel.force
            return self.drain_wait() if forced or \
                j.options.get('auto-finalize', True) else NO_BOUND
        if not (j.copying and j.copy_mode == 'write-blocking'):
            return 0.0
        if self.target_frozen():
            return self.stall_wait(self.active_write_timeout())
        # Its own copy, behind what the job has in flight
        return self.transfer_seconds(length + self.size)

    def active_write_timeout(self):
        """mirror_active_write_timeout(): stall-timeout if the user set it
        (0: forever), else the stall timeout in effect, at most 5 s"""
        if self.job.stall_timeout is not None:
            return self.job.stall_timeout
        stall = self.stall_timeout()
        return stall if 0 < stall < ACTIVE_WRITE_TIMEOUT \
            else ACTIVE_WRITE_TIMEOUT

    def quit_wait(self):
        """Seconds quit may take: while the job runs, its requests (and
        the flush of all nodes) wait for the target QUIT_STALL_TIMEOUT,
        then NBD_GRACE (block/nbd.c shuts a silent server's connection
        down); without a running job, a silent NBD server gets
        NBD_QUIT_GRACE; a throttled target that answers finishes what is
        in flight"""
        if self.guest_writes_on_frozen_target():
            return NO_BOUND
        if self.job.copying:        # the stall timer runs
            silent = QUIT_STALL_TIMEOUT + STALL_CHECK + NBD_GRACE
        else:
            silent = NBD_QUIT_GRACE
        return silent + self.transfer_seconds(self.size + self.aio_bytes())

    def guest_writes_on_frozen_target(self):
        """Guest aio writes wait for the frozen target, which the guest
        runs on since the pivot: every drain of it (a job-dismiss, which
        drops the job's hold of the target, for one) and quit (NBD watches
        only the requests sent after the quit) wait for them as long as it
        takes, with no job in between to give up (stock too)"""
        return bool(self.aio_writes) and self.target_frozen() and \
            self.guest_node() == 'tgt'

    def aio_bytes(self):
        return sum(w.length for w in self.aio_writes)

    # --- steps ----------------------------------------------------------

    def run(self, step):
        """Perform one step (a dict with 'op'), then check the invariants"""
        op = step['op']
        if op not in STEP_OPS:
            raise ScheduleError(f'unknown step op {op!r}')
        self.log(f'  step {step} (job {self.job.status})')
        self.current_op, status = op, self.job.status
        self.current_step = step
        self.aio_ended_in_step = []
        try:
            if op == 'wait':
                self.wait(step)
            else:
                self.busy_checked(getattr(self, STEP_OPS[op]), step)
            self.check()
        except Violation as v:
            v.where = v.where or f'{op} in {status}'
            raise

    def write(self, step):
        """A guest write: qemu-io's write, which the monitor waits for, or
        with 'aio' its aio_write, which runs while the monitor goes on (as
        a guest's writes do); check() follows it to its end"""
        offset, length = step['offset'], step['length']
        data = '-z' if step.get('zero') else f'-P {step["pattern"]}'
        verb = 'aio_write' if step.get('aio') else 'write'
        wait = self.write_wait(length)
        if step.get('aio') and wait != NO_BOUND:
            # behind the guest's aio writes still in flight
            wait += self.transfer_seconds(self.aio_bytes())
        reply = self.qmp_ok('human-monitor-command', {
            'command-line': qemu_io_command(
                GUEST, f'{verb} {data} {offset} {length}')}, wait=wait)
        if step.get('aio'):
            self.aio_writes.append(AioWrite(offset, length, time.monotonic(),
                                            wait))
        # qemu-io prints what its requests did on QEMU's stdout
        # (line-buffered): a write's end is in the log by the time the
        # reply came, an aio_write's by a later check
        self.guest_output(reply + self.check_processes(),
                          None if step.get('aio') else (offset, length))
        covered(f'inv 4: guest {verb} checked, job {self.job.status}, '
                f'{self.job.copy_mode}')
        if self.job.cancel:
            self.job.cancel.extend(self.transfer_seconds(step['length']))

    def target_ctl(self, step):
        t, action = self.target, step['action']
        if action == 'kill' and t.alive():
            t.kill()
            self.target_killed = self.target_trouble = True
        elif action == 'stop' and t.alive() and not t.stopped:
            t.stop()
        elif action == 'cont' and t.alive() and t.stopped:
            t.cont()
        elif action == 'restart' and not t.alive():
            t.start()
            self.target_killed = False
            self.throttle_bps = self.slowest_bps = 0
        else:
            return
        self.renew_bounds()

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
            # Even a refused swap may have put the rules in place
            self.target_trouble |= bool(rules)
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
        reopen) for one with these rules.  The model follows only once
        QEMU reads through the new node; a new node that the reopen
        refused is removed again"""
        new = f'sdbg{next(self.node_serial)}'
        self.qmp_ok('blockdev-add', blkdebug_node(new, 'sfile', rules))
        try:
            self.qmp_ok('blockdev-reopen', {'options': [{
                'driver': self.setup['format'], 'node-name': 'src',
                'file': new}]})
        except RuntimeError:
            self.qmp('blockdev-del', {'node-name': new})
            raise
        old, self.source_node = self.source_node, new
        self.source_faults = bool(rules)
        r = self.qmp('blockdev-del', {'node-name': old})
        if 'error' in r:
            self.log(f'  source faults: {old} stays: {r["error"]["desc"]}')

    def throttle(self, step):
        if self.target_usable() and \
                self.target_qmp(self.target.throttle, step['bps']):
            self.throttle_bps = step['bps']
            if step['bps']:
                self.slowest_bps = min(self.slowest_bps or step['bps'],
                                       step['bps'])
            self.renew_bounds()

    def pause(self, step):
        if 'error' not in self.qmp('job-pause', {'id': 'm'}):
            self.job.user_paused = True
            if self.job.cancel:
                self.job.cancel.pause(time.monotonic())

    def resume(self, step):
        if 'error' not in self.qmp('job-resume', {'id': 'm'}):
            self.job.user_paused = False
            if self.job.cancel:
                self.job.cancel.resume(time.monotonic())

    def cancel(self, step):
        force, j = step['force'], self.job
        before = self.query_job()
        r = self.qmp('block-job-cancel', {'device': 'm', 'force': force})
        if 'error' in r or j.ended:
            return
        j.user_paused = False       # job_cancel_async() resumes the job
        # A job that finished its work (WAITING, PENDING) and is cancelled
        # aborts, as if forced: mirror_cancel() forces every cancel of a
        # job that is not READY, and job_cancel_locked() then aborts it at
        # once (job_completed_txn_abort_locked()).  It never waits for a
        # job-finalize, and it never pivots (issue #13, item 2)
        after = self.query_job()
        if any(q and q['status'] in ('waiting', 'pending')
               for q in (before, after)):
            force = True
        # A soft cancel of a job that is (or was: ready-dirty-limit) READY
        # finishes the copy; our view of the status may be late
        j.finishing |= not force and (j.was_ready or bool(
            before and before['status'] in ('ready', 'standby')))
        now = time.monotonic()
        where = (f'{"force" if force else "soft"} cancel in {j.status}, '
                 f'target {self.target_state()}')
        covered(f'{"force" if step["force"] else "soft"} cancel accepted '
                f'in {before["status"] if before else j.status}')
        if j.cancel is None:
            j.cancel = CancelPromise(force, now,
                                     self.cancel_bound(force, before), where)
        elif force and not j.cancel.force:
            j.cancel.escalate(now, self.cancel_bound(True, before),
                              f'{where} after a soft cancel')
        self.renew_bounds()

    def cancel_bound(self, force, job):
        """Seconds within which an accepted cancel must end the job, as the
        job's settings promise (SLACK not included); NO_BOUND where nothing
        is promised"""
        if not self.claims and not self.target_usable():
            return NO_BOUND     # stock promises nothing on a target in trouble
        if force:
            # bdrv_cancel_unanswered(): NBD_GRACE for replies, then the
            # connection goes; a throttled target finishes what is in flight
            return STALL_CHECK + NBD_GRACE + self.transfer_seconds(self.size)
        left = job['len'] - job['offset'] if job else 0
        copy = self.transfer_seconds(left)
        if not self.claims:
            return copy
        j = self.job
        retries = RETRY_LIMIT_CANCELLED if j.retry_limit is None \
            else j.retry_limit
        delay = RETRY_DELAY_DEFAULT_MS if j.retry_delay is None \
            else j.retry_delay
        stall = CANCELLED_STALL_TIMEOUT if j.stall_timeout is None \
            else j.stall_timeout
        if stall == 0 and self.target_frozen():
            return NO_BOUND
        # Each attempt may wait for the stall timeout, then back off
        return (copy + backoff_seconds(retries, delay) +
                (retries + 1) * (stall + STALL_CHECK + NBD_GRACE))

    def renew_bounds(self):
        """The job's settings or state, the throttle or the target changed:
        an accepted cancel and the guest's aio writes are held to what they
        promise from now on, if that is later than their deadline"""
        c = self.job.cancel if self.job else None
        now = time.monotonic()
        if c and not self.job.ended:
            c.renew(now, self.cancel_bound(c.force, self.query_job()))
        for w in self.aio_writes:
            w.renew(now, self.write_wait(w.length))

    def complete(self, step):
        if 'error' not in self.qmp('block-job-complete', {'device': 'm'}):
            self.job.finishing = True
            if self.job.completed_at is None:
                self.job.completed_at = time.monotonic()
            self.renew_bounds()

    def finalize(self, step):
        if 'error' not in self.qmp('job-finalize', {'id': 'm'}):
            self.renew_bounds()

    def dismiss(self, step):
        self.qmp('job-dismiss', {'id': 'm'})

    def change(self, step):
        """block-job-change with one field (valid or not): the reply may
        be an error, but the answer must come"""
        field, value = step['field'], step['value']
        if field in SERIES_OPTIONS and not self.series:
            return
        r = self.qmp('block-job-change', {'id': 'm', 'type': 'mirror',
                                          field: value})
        if 'error' not in r:
            self.job.changed(field, value)
            self.renew_bounds()

    def query(self, step):
        self.query_job()

    def vm_ctl(self, step):
        if step['action'] == 'stop' and self.vm_running:
            self.qmp_ok('stop')
            self.vm_running = False
        elif step['action'] == 'cont' and not self.vm_running:
            self.qmp_ok('cont')
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
        where = f'wait in {self.job.status}, target {self.target_state()}'
        events = len(self.vm.q.events) - n_events
        if events / window > EVENT_RATE:
            raise Violation(4, 'event-storm',
                            f'{events} events in {window:.1f} s', where)
        self.check_busy(window, cpu, job0, job1, where)

    def busy_checked(self, action, step):
        """action(step), and if it took at least BUSY_WINDOW (a command
        that waits for the target: stop, a guest write, a cancel...),
        invariant 4's busy loop over that time"""
        start = time.monotonic()
        job0 = self.query_job()
        cpu0 = cpu_seconds(self.vm.proc.pid)
        action(step)
        window = time.monotonic() - start
        if window < BUSY_WINDOW or not self.vm.alive():
            return
        cpu = cpu_seconds(self.vm.proc.pid) - cpu0
        self.check_busy(window, cpu, job0, self.query_job(),
                        f'{self.current_op} in {self.job.status}, target '
                        f'{self.target_state()}')

    def check_busy(self, window, cpu, job0, job1, where):
        """Invariant 4: QEMU spent no more than BUSY_CPU of a core over
        window seconds, unless the job copied meanwhile"""
        if job0 and not job1:
            return      # the job ended meanwhile: its last copy is unknown
        progress = (job1['offset'] - job0['offset']) if job0 and job1 else 0
        covered('inv 4: CPU judged over a window')
        if cpu / window > BUSY_CPU and progress < SPIN_SHARE * self.size:
            raise Violation(4, 'busy-loop',
                            f'QEMU used {cpu:.1f} s CPU in {window:.1f} s '
                            f'while the job copied {progress} bytes', where)

    # --- invariants -----------------------------------------------------

    def hung(self, why, where):
        """QEMU did not answer in time: say why if it is gone, then kill it"""
        self.check_processes()
        cpu0 = cpu_seconds(self.vm.proc.pid)
        time.sleep(1)
        spin = cpu_seconds(self.vm.proc.pid) - cpu0
        self.vm.kill()
        # A QEMU that spins (livelock) and one that waits (blocked on the
        # target) are different defects
        raise Violation(1, 'qmp-timeout-spinning' if spin > BUSY_CPU else
                        'qmp-timeout', f'{self.current_op}: {why}; QEMU used '
                        f'{spin:.1f} s CPU in the next 1 s', where)

    def check_processes(self):
        """Invariant 1: QEMU and the daemon run and neither logged a crash;
        returns what QEMU logged since the last call"""
        qemu_text = self.qemu_log.read()
        for name, text in (('QEMU', qemu_text),
                           ('qemu-storage-daemon', self.qsd_log.read())):
            line = crash_line(text)
            if line:
                raise Violation(1, 'assertion', f'{name}: {line}',
                                f'{name}: {line}')
        if not self.vm.alive():
            raise Violation(1, 'died', f'QEMU exited with status '
                            f'{self.vm.proc.returncode}: '
                            f'{self.log_end("qemu.log")}',
                            f'status {self.vm.proc.returncode}')
        t = self.target.proc
        if t.poll() is not None and not self.target_killed:
            raise Violation(1, 'target-died', f'qemu-storage-daemon exited '
                            f'with status {t.returncode}: '
                            f'{self.log_end("qsd.log")}',
                            f'status {t.returncode}')
        return qemu_text

    def log_end(self, name, chars=300):
        with open(self.path(name), errors='replace') as f:
            return f.read()[-chars:].strip()

    def guest_output(self, qemu_text, sync_write=None):
        """What qemu-io printed: the ends of the guest's aio writes (and of
        sync_write, (offset, length), which is not one of them), and its
        failures (invariant 4)"""
        ended = [(int(o), int(n)) for n, o in QEMU_IO_WROTE.findall(qemu_text)]
        if sync_write in ended:
            ended.remove(sync_write)
        for offset, length in ended:
            w = next((w for w in self.aio_writes
                      if (w.offset, w.length) == (offset, length)), None)
            if w:
                self.aio_writes.remove(w)
                self.aio_ended_in_step.append(w)
        failed = self.check_guest_writes(qemu_text)
        # An aio write that failed (where that is allowed) has ended too;
        # qemu-io does not say which: the oldest
        aio_failed = sum(f.startswith('aio_write') for f in failed or ())
        self.aio_ended_in_step += self.aio_writes[:aio_failed]
        del self.aio_writes[:aio_failed]

    def check_aio_writes(self):
        """Invariant 4: the guest's aio writes end within their bound"""
        now = time.monotonic()
        for w in self.aio_writes:
            covered('inv 4: aio write bound checked')
            if now > w.deadline:
                raise Violation(4, 'guest-write-late',
                                f'aio_write at {w.offset}+{w.length} '
                                f'issued {now - w.issued_at:.1f} s ago, '
                                f'deadline passed {now - w.deadline:.1f} s '
                                f'ago', f'{self.job.status}, '
                                f'{self.job.copy_mode}, target '
                                f'{self.target_state()}')

    def check_guest_writes(self, qemu_text):
        """Invariant 4: guest writes succeed (returns qemu-io's failure
        messages where they are allowed), unless the guest runs on a
        target that was killed or given faults, or read errors are injected
        on a qcow2 source: a guest write reads no data, but qcow2 may read
        its metadata (blkdebug then fails every read).  On a raw source,
        the source's faults never excuse a failed write.  qemu_text:
        QEMU's output (its log, an HMP reply), where qemu-io reports its
        failures"""
        failures = qemu_io_failures(qemu_text)
        if not failures:
            return failures
        if self.source_faults and self.setup['format'] == 'qcow2' and \
                self.guest_node() == 'src':
            self.log(f'  write failed, read errors injected on the qcow2 '
                     f'source: {failures}')
            return failures
        if self.target_trouble and self.guest_node() == 'tgt':
            self.log(f'  write failed on the target in trouble: {failures}')
            return failures
        raise Violation(4, 'guest-write-failed', '; '.join(failures),
                        f'{failures[0]} in {self.job.status}, '
                        f'{self.job.copy_mode}')

    def query_job(self):
        jobs = self.qmp_ok('query-block-jobs')
        return jobs[0] if jobs else None

    def guest_node(self):
        for b in self.qmp_ok('query-block'):
            if b.get('qdev', '').startswith('/machine/peripheral/vblk'):
                return b.get('inserted', {}).get('node-name')
        raise Violation(5, 'no-device', 'query-block lost the guest device')

    def check(self):
        """Every invariant, after a step"""
        self.guest_output(self.check_processes())
        self.check_aio_writes()
        # query-block before the events: see check_authority()
        allowed_before = self.allowed_nodes()
        node = self.guest_node()
        self.vm.q.pull_events()
        self.check_events()
        self.check_cancel_bound()
        self.check_authority(node, allowed_before)

    def check_events(self, settle=True):
        j = self.job
        for ev in self.vm.q.events[self._seen:]:
            name, data = ev['event'], ev.get('data', {})
            if name == 'JOB_STATUS_CHANGE' and data.get('id') == 'm':
                new, old = data['status'], j.status
                legal = EDGES[old] | (SERIES_EDGES.get(old, set())
                                      if j.ready_limit and self.series
                                      else set())
                if new not in legal:
                    raise Violation(2, 'illegal-edge',
                                    f'{old} -> {new} (ready-dirty-limit '
                                    f'{"set" if j.ready_limit else "unset"})',
                                    f'{old}->{new}')
                if new == 'ready' and old == 'running':
                    j.readies += 1
                    j.was_ready = True
                if new == 'null' and not j.ends:
                    raise Violation(2, 'no-end-event',
                                    'job reached null without an end event',
                                    old)
                j.status = new
                covered(f'status {new}')
            elif name == 'BLOCK_JOB_READY' and data.get('device') == 'm':
                j.ready_events += 1
                if j.status != 'ready':
                    raise Violation(2, 'ready-event-mismatch',
                                    f'BLOCK_JOB_READY while {j.status}',
                                    j.status)
            elif name in END_EVENTS and data.get('device') == 'm':
                j.ends.append(ev)
                if len(j.ends) > 1:
                    raise Violation(2, 'two-end-events',
                                    f'{[e["event"] for e in j.ends]}',
                                    '+'.join(e['event'] for e in j.ends))
                self.on_end(ev)
        self._seen = len(self.vm.q.events)
        if j.ready_events < j.readies and settle:
            # QEMU sends BLOCK_JOB_READY right after the status change: the
            # last pull may have come between the two
            self.vm.q.wait_event(['BLOCK_JOB_READY'], READY_EVENT_DELAY,
                                 since=self._seen)
            return self.check_events(settle=False)
        if j.ready_events != j.readies:
            raise Violation(2, 'ready-event-mismatch',
                            f'{j.ready_events} BLOCK_JOB_READY events for '
                            f'{j.readies} transitions into ready',
                            f'{j.ready_events} for {j.readies}')

    def waits_for_finalize(self):
        """A job that waits in PENDING for our job-finalize is not late;
        a forced cancel (one accepted in PENDING, too) aborts it without
        one"""
        j = self.job
        return j.status == 'pending' and \
            not j.options.get('auto-finalize', True) and \
            not (j.cancel and j.cancel.force)

    def check_cancel_bound(self):
        j, c = self.job, self.job.cancel
        if c is None or j.ended or self.waits_for_finalize():
            return
        now = time.monotonic()
        covered('inv 3: cancel bound checked' if c.deadline < NO_BOUND else
                'inv 3: cancel with no bound (stall-timeout 0, frozen)')
        if c.overdue(now):
            raise Violation(3, 'force-cancel-late' if c.force else
                            'cancel-late',
                            f'{c.where}: accepted {now - c.accepted_at:.1f} '
                            f's ago, deadline passed {now - c.deadline:.1f} '
                            f's ago, job still {j.status}', c.where)

    def allowed_nodes(self):
        """Where the guest may be, as far as the events so far tell"""
        j = self.job
        if j.cancel:
            return {'src'}          # an accepted cancel never pivots
        if not j.ended:
            # The pivot happens while the job finishes
            return {'src', 'tgt'} if j.status in (
                'waiting', 'pending', 'concluded') else {'src'}
        ev = j.ends[0]
        if ev['event'] == 'BLOCK_JOB_COMPLETED' and 'error' not in \
                ev['data'] and j.completed_at is not None:
            return {'tgt'}
        return {'src'}

    def check_authority(self, node, allowed_before):
        """Invariant 5.  node is query-block's answer, asked after the
        events that allowed_before is made of and before the next ones:
        QEMU answered it between the two sets of events, in a state that
        either allows.  The guest's node only changes once (the pivot),
        between states that allow both, so the union is exact; a wrong
        node shows in the next check, where before and after agree."""
        if node not in ('src', 'tgt'):
            raise Violation(5, 'unknown-node', f'guest on {node}', str(node))
        allowed = allowed_before | self.allowed_nodes()
        covered(f'inv 5: guest on {node}, allowed '
                f'{"/".join(sorted(allowed))}')
        if node in allowed:
            return
        j = self.job
        how = (f'after an accepted {j.cancel.where}' if j.cancel else
               'after a completed pivot' if allowed == {'tgt'} else
               'after the job ended')
        raise Violation(5, 'wrong-node',
                        f'guest on {node}, not {"/".join(sorted(allowed))}, '
                        f'{how} (ended with '
                        f'{j.ends[0]["event"] if j.ends else "-"})',
                        f'on {node} {how}')

    def on_end(self, ev):
        """Invariant 6: a job that completed (pivot, or a soft cancel after
        READY) left the target identical to the source"""
        j = self.job
        covered(f'end: {ev["event"]}' + (' with error' if 'error' in
                                         ev['data'] else ''))
        if ev['event'] != 'BLOCK_JOB_COMPLETED' or 'error' in ev['data']:
            return
        if not j.was_ready:
            return
        # A guest write in this very step, and an aio write that has not
        # ended before it, may have gone to the target alone after the
        # pivot (or to the source alone after a soft cancel's last copy):
        # everything else must be the same
        step = self.current_step
        skip = [(w.offset, w.length)
                for w in self.aio_writes + self.aio_ended_in_step]
        if self.current_op == 'write' and not step.get('aio'):
            skip.append((step['offset'], step['length']))
        self.compare_images('job completed', skip)

    def compare_images(self, why, skip=()):
        """Invariant 6: qemu-img compare of source and target; with skip,
        a list of (offset, length), the bytes outside those ranges"""
        fmt = self.setup['format']
        # QEMU may still hold the source's new qcow2 metadata in its cache
        self.qmp_ok('human-monitor-command',
                    {'command-line': 'qemu-io src "flush"'})
        if skip:
            differs = self.differs_outside(skip)
        else:
            r = subprocess.run([f'{self.build}/qemu-img', 'compare', '-f',
                                fmt, '-F', 'raw', '-U', self.src_img,
                                self.tgt_img],
                               capture_output=True, text=True, timeout=60)
            differs = r.returncode and (r.stdout + r.stderr).strip()
        covered('inv 6: images compared' + (' outside writes' if skip
                                             else ''))
        if differs:
            raise Violation(6, 'data-differs', f'{why}: {differs}', why)

    def differs_outside(self, ranges):
        """Where source and target differ outside the ranges, (offset,
        length) each (qemu-img compare knows no ranges: the source is
        converted to raw and both are compared byte for byte), or None"""
        raw = self.path('src-as-raw')
        subprocess.run([f'{self.build}/qemu-img', 'convert', '-U', '-f',
                        self.setup['format'], '-O', 'raw', self.src_img, raw],
                       check=True, timeout=60)
        with open(raw, 'rb') as f:
            src = f.read()
        with open(self.tgt_img, 'rb') as f:
            tgt = f.read()
        os.unlink(raw)
        lo = 0
        for offset, length in sorted(ranges) + [(max(len(src), len(tgt)),
                                                  0)]:
            if src[lo:offset] != tgt[lo:offset]:
                first = next(i for i in range(lo, offset)
                             if src[i:i + 1] != tgt[i:i + 1])
                return (f'content differs at offset {first} (outside the '
                        f'writes that may have met the pivot: {ranges})')
            lo = max(lo, offset + length)
        return None

    # --- the end --------------------------------------------------------

    def finish(self):
        """The end of a schedule: let a promised cancel end, check, quit;
        QEMU must exit with status 0"""
        self.current_op = 'quit'
        j, c = self.job, self.job.cancel
        if c and not j.ended and c.deadline < NO_BOUND and \
                c.paused_since is None and not self.waits_for_finalize():
            left = min(c.deadline - time.monotonic(), LONGEST_WAIT)
            self.vm.q.wait_event(END_EVENTS, max(left, 0))
        try:
            self.check()
        except Violation as v:
            v.where = v.where or f'quit in {j.status}'
            raise
        where = f'quit in {j.status}, target {self.target_state()}'
        wait = self.quit_wait()
        bound = UNBOUNDED_WAIT if wait == NO_BOUND else wait + SLACK
        if wait != NO_BOUND:
            covered(f'inv 3: quit bound checked, target '
                    f'{self.target_state()}, job '
                    f'{"copying" if j.copying else "not copying"}')
        took = self.vm.quit(bound)
        if took is None and wait == NO_BOUND:
            raise Unbounded('quit: QEMU did not exit', where)
        if took is None:
            if self.claims or self.target_usable():
                raise Violation(3, 'quit-late', f'quit did not end QEMU '
                                f'within {bound:.1f} s (target '
                                f'{self.target_state()})', where)
            return                  # killed: no exit status to check
        for name, log in (('QEMU', self.qemu_log),
                          ('qemu-storage-daemon', self.qsd_log)):
            line = crash_line(log.read(partial=True))
            if line:
                raise Violation(1, 'assertion', f'{name}: {line}',
                                f'{name}: {line}')
        status = self.vm.proc.returncode
        if status != 0:
            raise Violation(1, 'exit-status', f'QEMU exited with status '
                            f'{status} after quit' + (
                                f' (signal {-status})' if status < 0 else ''),
                            f'status {status}, {where}')

    def close(self):
        """Kill everything (what a failed setup started, too), remove every
        file"""
        if self.vm:
            self.vm.kill()
        if self.target:
            kill_group(self.target.proc)
        for proc in set(qemu_procs.STARTED) - self.procs_before:
            kill_group(proc)
        shutil.rmtree(self.work, ignore_errors=True)
