"""Each of world.py's checks, fed a situation that breaks its invariant,
must fire: a check that cannot fail proves nothing.  No QEMU runs here
(only qemu-img, for invariant 6); the World is made without processes and
given the events and answers of the situation.  The must-fail schedules
(tests/stress/must-fail/) do the same with real processes where a build
breaks an invariant on its own.

    cases(build) -> [(name, expected violation key, function)]
"""

import os
import shutil
import subprocess
import tempfile
import time

import world
from qemu_procs import MiB


class FakeQmp:
    def __init__(self, events):
        self.events = list(events)

    def pull_events(self, wait=0.0):
        return []

    def wait_event(self, names, timeout, since=0):
        return next((e for e in self.events[since:] if e['event'] in names),
                    None)


class FakeTarget:
    stopped = False

    def alive(self):
        return True


class FakeVm:
    def __init__(self, events):
        self.q = FakeQmp(events)

    def cmd(self, name, args=None, timeout=None):
        return {'return': {}}


def fake_world(build, options=None, events=(), series=True):
    """A World in the state that the events left its job in"""
    w = world.World.__new__(world.World)
    w.build, w.series, w.claims = build, series, series
    w.setup = {'format': 'raw', 'size_mib': 1}
    w.size = MiB
    w.work = tempfile.mkdtemp(prefix='st-self-test-')
    WORK_DIRS.append(w.work)
    w.vm, w.target, w.throttle_bps = FakeVm(events), FakeTarget(), 0
    w.current_op, w.current_step = 'self-test', None
    w.aio_writes, w.aio_ended_in_step = [], []
    w.job = world.Job(dict(options or {}))
    w._seen = 0
    return w


WORK_DIRS = []


def status(new):
    return {'event': 'JOB_STATUS_CHANGE', 'data': {'id': 'm',
                                                   'status': new}}


def event(name, **data):
    return {'event': name, 'data': dict(device='m', **data)}


RUNNING = [status('created'), status('running')]
READY = RUNNING + [status('ready'), event('BLOCK_JOB_READY')]


def illegal_edge(build):
    # READY -> RUNNING without a ready-dirty-limit
    fake_world(build, events=READY + [status('running')]).check_events()


def missing_ready_event(build):
    fake_world(build, events=RUNNING + [status('ready')]).check_events()


def two_end_events(build):
    w = fake_world(build, events=READY + [
        event('BLOCK_JOB_COMPLETED'), event('BLOCK_JOB_CANCELLED')])
    w.on_end = lambda ev: None       # no images to compare
    w.check_events()


def cancel_late(build):
    w = fake_world(build, events=READY)
    w.check_events()
    w.job.cancel = world.CancelPromise(False, time.monotonic() - 100, 1,
                                       'soft cancel in ready')
    w.check_cancel_bound()


def pending_cancel_late(build):
    """The v1 defect: a cancel accepted in PENDING (auto-finalize off) that
    leaves the job there is late, not waiting for a finalize"""
    w = fake_world(build, {'auto-finalize': False}, events=READY + [
        status('waiting'), status('pending')])
    w.check_events()
    w.job.cancel = world.CancelPromise(True, time.monotonic() - 100, 1,
                                       'soft cancel in pending')
    w.check_cancel_bound()


def pivot_after_cancel(build):
    w = fake_world(build, events=READY)
    w.check_events()
    w.job.cancel = world.CancelPromise(False, time.monotonic(), 100,
                                       'soft cancel in ready')
    w.check_authority('tgt', w.allowed_nodes())


def no_pivot_after_complete(build):
    w = fake_world(build, events=READY)
    w.check_events()
    w.job.completed_at = time.monotonic()
    w.vm.q.events += [status('waiting'), status('pending'),
                      event('BLOCK_JOB_COMPLETED')]
    w.on_end = lambda ev: None       # invariant 6 is the next case's
    w.check_events()
    w.check_authority('src', w.allowed_nodes())


def images(w, differ_at):
    """Source and target images of w, equal but for one byte"""
    w.src_img, w.tgt_img = (os.path.join(w.work, n) for n in ('s', 't'))
    for path, byte in ((w.src_img, b'\1'), (w.tgt_img, b'\2')):
        data = bytearray(MiB)
        data[differ_at] = byte[0]
        with open(path, 'wb') as f:
            f.write(data)


def data_differs(build):
    w = fake_world(build)
    images(w, 4096)
    w.compare_images('self-test')


def data_differs_outside_a_write(build):
    w = fake_world(build)
    images(w, 4096)
    w.compare_images('self-test', skip=[(0, 512)])


def data_same_inside_a_write(build):
    """Not a must-fire case: a difference within the write that met the
    pivot is allowed (the check returns quietly)"""
    w = fake_world(build)
    images(w, 4096)
    w.compare_images('self-test', skip=[(8192, 512), (4096, 512)])


def busy_loop(build):
    # 1.9 s of CPU in 2 s while the job copied nothing
    fake_world(build).check_busy(2.0, 1.9, {'offset': 0}, {'offset': 0},
                                 'self-test')


def aio_write_late(build):
    w = fake_world(build, events=READY)
    w.check_events()
    w.aio_writes.append(world.AioWrite(0, 512, time.monotonic() - 100, 1))
    w.check_aio_writes()


CASES = (
    ('a guest aio_write that never ends', '4-guest-write-late',
     aio_write_late),
    ('QEMU busy while the job copies nothing', '4-busy-loop', busy_loop),
    ('READY -> RUNNING without ready-dirty-limit', '2-illegal-edge',
     illegal_edge),
    ('READY without BLOCK_JOB_READY', '2-ready-event-mismatch',
     missing_ready_event),
    ('two end events', '2-two-end-events', two_end_events),
    ('soft cancel past its deadline', '3-cancel-late', cancel_late),
    ('cancel accepted in PENDING, job still PENDING',
     '3-force-cancel-late', pending_cancel_late),
    ('guest on the target after a cancel', '5-wrong-node',
     pivot_after_cancel),
    ('guest on the source after a completed pivot', '5-wrong-node',
     no_pivot_after_complete),
    ('images differ', '6-data-differs', data_differs),
    ('images differ outside a write that met the pivot', '6-data-differs',
     data_differs_outside_a_write),
    ('images differ only inside that write', None, data_same_inside_a_write),
)


def run(build):
    """[(name, ok, what)] for every case"""
    results = []
    for name, key, fn in CASES:
        try:
            fn(build)
            outcome = None
        except world.Violation as v:
            outcome = v
        except (OSError, subprocess.SubprocessError) as e:
            results.append((name, False, f'error: {e}'))
            continue
        finally:
            while WORK_DIRS:
                shutil.rmtree(WORK_DIRS.pop(), ignore_errors=True)
        got = outcome.key if outcome else None
        results.append((name, got == key,
                        f'fires {key}' if key and got == key else
                        'stays quiet' if got == key else
                        f'expected {key or "nothing"}, got '
                        f'{outcome or "nothing"}'))
    return results
