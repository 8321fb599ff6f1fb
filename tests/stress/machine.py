"""The Hypothesis state machine: draws a setup and steps, hands each to a
World (world.py), and records them as a schedule that can be replayed.

Hypothesis chooses the schedules and shrinks a failing one; the run's
Context (stress.py) keeps, for every signature of violation (its kind and
where it showed), the shortest schedule that showed it.
"""

import traceback

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule

from qemu_procs import MiB
from world import VERB_TABLE, Unbounded, Violation, World

KiB = 1024
ERRNOS = (5, 28)           # EIO, ENOSPC
POLICIES = ('report', 'ignore', 'stop', 'enospc')


class StopRun(KeyboardInterrupt):
    """The run's time is up.  Hypothesis lets a KeyboardInterrupt through
    without recording the example; any other exception would be taken for
    a failure (saved, and then "Flaky: Inconsistent data generation")"""


# Set by stress.py before a run: build, work dir, masked signatures, and
# where violations, unbounded waits and errors of the tool are recorded.
CONTEXT = None


def optional(key, strategy):
    """A dict with key -> a drawn value, or an empty dict"""
    return st.one_of(st.just({}), strategy.map(lambda v: {key: v}))


def merged(*dicts):
    return st.tuples(*dicts).map(
        lambda ds: {k: v for d in ds for k, v in d.items()})


def mirror_options():
    """Random but valid blockdev-mirror options (the series' ones too:
    dropped on a build without the series)"""
    base = st.fixed_dictionaries({
        'copy-mode': st.sampled_from(['background', 'write-blocking']),
        'on-source-error': st.sampled_from(POLICIES),
        'on-target-error': st.sampled_from(POLICIES),
        # Small granularity and buffer: areas that need several operations
        'granularity': st.sampled_from([64 * KiB, 4 * KiB, 512, MiB]),
        'buf-size': st.sampled_from([MiB, 128 * KiB, 8 * MiB]),
        'auto-finalize': st.booleans(),
        'auto-dismiss': st.booleans(),
    })
    return merged(
        base,
        optional('retry-limit', st.sampled_from([0, 1, 3, 10])),
        optional('retry-delay', st.sampled_from([100, 1, 10, 1000])),
        optional('stall-timeout', st.sampled_from([0, 1, 2, 5])),
        optional('ready-dirty-limit', st.sampled_from([64 * KiB, MiB, 0])),
    ).map(lambda o: dict(o, **{'buf-size': max(o['buf-size'],
                                               o['granularity'])}))


def fault_steps(sides=('target', 'source')):
    """Inject one error rule (io None: remove the faults of that side)"""
    target = st.fixed_dictionaries({
        'op': st.just('fault'), 'side': st.just('target'),
        'io': st.sampled_from(['zero', 'write', 'flush', None]),
        'errno': st.sampled_from(ERRNOS), 'once': st.booleans()})
    source = st.fixed_dictionaries({
        'op': st.just('fault'), 'side': st.just('source'),
        'io': st.sampled_from(['read', None]),
        'errno': st.sampled_from(ERRNOS), 'once': st.booleans()})
    return st.one_of(target, source) if 'source' in sides else target


# Source contents: extents of 64 KiB units, data or zeroes
extent = st.tuples(st.sampled_from(['data', 'zero']), st.integers(0, 127),
                   st.integers(1, 32), st.integers(1, 255))

setups = st.fixed_dictionaries({
    'format': st.sampled_from(['qcow2', 'raw']),
    'size_mib': st.sampled_from([4, 2, 8]),
    'layout': st.lists(extent, max_size=4),
    'iothread': st.booleans(),
    'transport': st.sampled_from(['unix', 'tcp']),
    'throttle': st.sampled_from([0, MiB, 4 * MiB]),
    'faults': st.lists(fault_steps(('target',)), max_size=2),
    'mirror': mirror_options(),
})

# Verbs on the job.  A step draws a choice in range(CHOICES): two thirds of
# them pick among the verbs that QEMU accepts in the job's status (job.c
# JobVerbTable, copied in world.VERB_TABLE; 24 choices split evenly over 1
# to 6 entries), the others among all verbs, so that most commands move the
# job along and some are refused.  The concrete verb is what gets recorded.
# Each verb of ours and the job verb (JobVerb) it is:
JOB_VERB = {'cancel': 'cancel', 'force-cancel': 'cancel',
            'complete': 'complete', 'pause': 'pause', 'resume': 'resume',
            'finalize': 'finalize', 'dismiss': 'dismiss'}
VERBS = tuple(JOB_VERB)
ACCEPTED_CHOICES, CHOICES = 24, 36


def accepted_verbs(status):
    """Our verbs that QEMU's verb table accepts in this status; complete
    counts twice, so that more jobs pivot (and their data is compared)"""
    return tuple(w for v in VERBS if status in VERB_TABLE[JOB_VERB[v]]
                 for w in ((v, v) if v == 'complete' else (v,)))

# block-job-change: a field and a value, valid or not
CHANGES = {
    'copy-mode': ['write-blocking', 'background', 'foo'],
    'retry-limit': [0, 5, 4294967295, -1, 4294967296],
    'retry-delay': [1, 100, 60000, 0, 60001],
    'stall-timeout': [0, 1, 3, -1],
    'ready-dirty-limit': [64 * KiB, MiB, None, -1],
}


def verb_for(status, choice):
    accepted = accepted_verbs(status) or VERBS
    if choice < ACCEPTED_CHOICES:
        return accepted[choice % len(accepted)]
    return VERBS[choice % len(VERBS)]


# The steps, by family; the rules below draw one family each
WRITES = st.fixed_dictionaries({
    'op': st.just('write'), 'offset': st.integers(0, 16383),
    'length': st.sampled_from([64 * KiB, 512, 4 * KiB, MiB, 3 * MiB]),
    'pattern': st.integers(1, 255), 'zero': st.booleans(),
    'aio': st.booleans()})
TARGET = st.fixed_dictionaries({
    'op': st.just('target-ctl'),
    'action': st.sampled_from(['kill', 'stop', 'cont', 'restart'])})
THROTTLE = st.fixed_dictionaries({
    'op': st.just('throttle'), 'bps': st.sampled_from([MiB, 0, 4 * MiB])})
JOB = st.fixed_dictionaries({
    'op': st.just('job'), 'choice': st.integers(0, CHOICES - 1)})
CHANGE = st.sampled_from(sorted(CHANGES)).flatmap(
    lambda field: st.fixed_dictionaries({
        'op': st.just('change'), 'field': st.just(field),
        'value': st.sampled_from(CHANGES[field])}))
VM = st.fixed_dictionaries({
    'op': st.sampled_from(['vm-ctl', 'query']),
    'action': st.sampled_from(['stop', 'cont'])})
WAIT = st.fixed_dictionaries({
    'op': st.just('wait'), 'seconds': st.sampled_from([2.0, 0.5, 4.0])})
STEPS = st.one_of(JOB, WAIT, WRITES, TARGET, fault_steps(), THROTTLE,
                  CHANGE, VM)
# The job's life cycle (READY, complete, WAITING, PENDING, finalize or
# cancel, CONCLUDED, dismiss) takes several verbs with waits between them,
# and one fault (or a cancel) ends it early: so a rule draws a run of verbs
# and waits (two verbs for a wait), about as many steps as all the other
# rules together
LIFECYCLE = st.lists(st.one_of(JOB, JOB, WAIT), min_size=2, max_size=6)


class MirrorStress(RuleBasedStateMachine):
    """One source QEMU, its target and one mirror job per example.

    The job starts with a burst of steps drawn with the setup: Hypothesis
    often ends a stateful example after its first rule, and a schedule
    without steps tests nothing.  More steps follow, one rule each."""

    def __init__(self):
        super().__init__()
        CONTEXT.before_example()
        self.world = None
        self.schedule = None
        self.done = False       # a violation ended this example
        self.violation = None

    @initialize(setup=setups, burst=st.lists(STEPS, min_size=3, max_size=8))
    def start(self, setup, burst):
        self.schedule = {'setup': setup, 'steps': []}
        self.guard(lambda: self._start(setup))
        for step in burst:
            self.step(step)

    def _start(self, setup):
        self.world = World(CONTEXT.build, CONTEXT.work, setup, CONTEXT.log)

    def guard(self, action):
        """Run action; a violation is recorded and ends the example's
        processes.  It is raised only at teardown (unless its signature is
        masked in this run): the steps left are still drawn, so that the
        data Hypothesis draws does not depend on when, with timing, the
        violation came.  An unbounded wait ends the example without a
        verdict; any other exception is an error of the tool, recorded
        with its traceback (and fails the run)."""
        if self.done:
            return
        try:
            action()
        except Violation as v:
            CONTEXT.record(self.schedule, v)
            self.violation = v
            self.end()
        except Unbounded as u:
            CONTEXT.record_unbounded(self.schedule, u)
            self.end()
        except Exception:
            CONTEXT.record_tool_error(self.schedule, traceback.format_exc())
            self.end()

    def end(self):
        self.done = True
        self.close()

    def concrete(self, step):
        """The step as it is recorded and replayed"""
        step = dict(step)
        if step['op'] == 'job':
            verb = verb_for(self.world.job.status, step.pop('choice'))
            step = ({'op': 'cancel', 'force': verb == 'force-cancel'}
                    if verb.endswith('cancel') else {'op': verb})
        elif step['op'] == 'write':
            size = self.world.setup['size_mib'] * MiB
            step['offset'] = step['offset'] * 512 % size
            step['length'] = min(step['length'], size - step['offset'])
        elif step['op'] == 'query':
            step.pop('action')
        return step

    def step(self, step):
        CONTEXT.steps_drawn += 1
        if self.done or self.world is None:
            return
        step = self.concrete(step)
        self.schedule['steps'].append(step)
        self.guard(lambda: self.world.run(step))

    @rule(steps=LIFECYCLE)
    def lifecycle(self, steps):
        for step in steps:
            self.step(step)

    @rule(step=WRITES)
    def write(self, step):
        self.step(step)

    @rule(step=TARGET)
    def target(self, step):
        self.step(step)

    @rule(step=fault_steps())
    def fault(self, step):
        self.step(step)

    @rule(step=THROTTLE)
    def throttle(self, step):
        self.step(step)

    @rule(step=CHANGE)
    def change(self, step):
        self.step(step)

    @rule(step=VM)
    def vm(self, step):
        self.step(step)

    def close(self):
        if self.world:
            self.world.close()
            self.world = None

    def teardown(self):
        CONTEXT.steps_drawn += 1        # the quit that ends every schedule
        try:
            if self.world and not self.done:
                self.schedule['steps'].append({'op': 'quit'})
                self.guard(self.world.finish)
        finally:
            self.close()
            CONTEXT.after_example(self.schedule)
        v = self.violation
        if v and v.signature not in CONTEXT.masked:
            # One exception type per signature: Hypothesis tells failures
            # apart by type, and shrinks each one separately
            raise CONTEXT.exception_type(v.signature)(str(v)) from v
