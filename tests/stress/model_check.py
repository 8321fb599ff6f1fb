"""The model's copies of QEMU's tables and constants (world.py) against
QEMU's source: job.c's JobSTT and JobVerbTable, the #defines that the
bounds come from, and the lines of code the model imitates.  `stress.py
ci` runs it first (one TAP line), `stress.py check-model` alone.

    differences(tree) -> a list of what differs (empty: the model matches)
"""

import os
import re

import world

# world.py's name, QEMU's file and #define, and the factor to world's unit
CONSTANTS = (
    ('NBD_GRACE', 'block/nbd.c', 'NBD_CANCEL_GRACE_NS', 1e-9),
    ('NBD_QUIT_GRACE', 'block/nbd.c', 'NBD_QUIT_GRACE_NS', 1e-9),
    ('ACTIVE_WRITE_TIMEOUT', 'block/mirror.c',
     'MIRROR_ACTIVE_WRITE_TIMEOUT_DEFAULT', 1),
    ('DRAINED_STALL_TIMEOUT', 'block/mirror.c',
     'MIRROR_STALL_TIMEOUT_DRAINED', 1),
    ('CANCELLED_STALL_TIMEOUT', 'block/mirror.c',
     'MIRROR_STALL_TIMEOUT_CANCELLED', 1),
    ('QUIT_STALL_TIMEOUT', 'block/mirror.c', 'MIRROR_STALL_TIMEOUT_QUIT', 1),
    ('STALL_CHECK', 'block/mirror.c', 'MIRROR_STALL_CHECK_NS', 1e-9),
    ('RETRY_LIMIT_CANCELLED', 'include/block/blockjob.h',
     'BLOCK_JOB_RETRY_LIMIT_CANCELLED', 1),
    ('RETRY_DELAY_DEFAULT_MS', 'include/block/blockjob.h',
     'BLOCK_JOB_RETRY_DELAY_DEFAULT', 1),
    ('BACKOFF_CAP_MS', 'include/block/blockjob.h',
     'BLOCK_JOB_RETRY_BACKOFF_CAP', 1),
)

# Lines of QEMU's code that the model imitates, by file
IMITATED = (
    # world.backoff_seconds()
    ('blockjob.c', 'int64_t cap = MAX(delay, BLOCK_JOB_RETRY_BACKOFF_CAP);'),
    # world.World.stall_timeout()
    ('block/mirror.c', 'timeout = MIRROR_STALL_TIMEOUT_CANCELLED;'),
    ('block/mirror.c', 'timeout = MIRROR_STALL_TIMEOUT_DRAINED;'),
    # world.World.drain_wait(): others' requests wait as long as the job's
    ('block/mirror.c', 'int64_t timeout = MIRROR_STALL_TIMEOUT_DRAINED;'),
    # world.World.cancel(): a cancel of a job that is not READY is forced
    ('block/mirror.c', 'return force || !job_is_ready(job);'),
)

# What the units of a #define's expression are worth
UNITS = {'SCALE_MS': 10 ** 6, 'SCALE_US': 10 ** 3, 'SCALE_NS': 1,
         'NANOSECONDS_PER_SECOND': 10 ** 9}


def read(tree, name):
    with open(os.path.join(tree, name), encoding='utf-8') as f:
        return f.read()


def define_value(source, name):
    """The value of `#define name <arithmetic>`, or None"""
    m = re.search(rf'^#define\s+{name}\s+(.+?)\s*(?:/\*.*)?$', source, re.M)
    if not m:
        return None
    expr = m.group(1)
    for unit, value in UNITS.items():
        expr = expr.replace(unit, str(value))
    if not re.fullmatch(r'[\d\s()*+/.-]+', expr):
        return None
    return eval(expr)       # digits and operators only, checked above


def c_table(source, name):
    """A C table `bool name[..][..] = { [ROW] = {0, 1, ...}, ... };` as
    {row: [0/1...]}, rows in their order in the source"""
    m = re.search(rf'\b{name}\[[^=]*=\s*{{(.*?)\n}};', source, re.S)
    if not m:
        raise ValueError(f'no table {name}')
    rows = re.findall(r'\[(\w+)\]\s*=\s*{([\d,\s]+)}', m.group(1))
    return {row: [int(x) for x in cells.split(',')] for row, cells in rows}


def qapi_name(enum, prefix):
    """JOB_STATUS_PENDING -> pending, JOB_VERB_SET_SPEED -> set-speed"""
    return enum[len(prefix):].lower().replace('_', '-')


def job_tables(job_c):
    """job.c's state and verb tables, as world.py writes them: {status:
    set of next statuses} and {verb: set of statuses accepting it}"""
    stt = c_table(job_c, 'JobSTT')
    # The rows of JobSTT are the statuses in their enum order: the columns
    statuses = [qapi_name(row, 'JOB_STATUS_') for row in stt]
    edges = {qapi_name(row, 'JOB_STATUS_'):
             {s for s, on in zip(statuses, cells) if on}
             for row, cells in stt.items()}
    verbs = {qapi_name(row, 'JOB_VERB_'):
             {s for s, on in zip(statuses, cells) if on}
             for row, cells in c_table(job_c, 'JobVerbTable').items()}
    return edges, verbs


def table_differences(name, ours, qemus):
    out = []
    for row in sorted(set(ours) | set(qemus)):
        mine, theirs = ours.get(row, set()), qemus.get(row, set())
        if mine != theirs:
            out.append(f'{name}[{row}]: model {sorted(mine)}, job.c '
                       f'{sorted(theirs)}')
    return out


def differences(tree):
    """What differs between world.py's model and the QEMU source in tree"""
    edges, verbs = job_tables(read(tree, 'job.c'))
    # The series adds READY -> RUNNING; the model allows it only with a
    # ready-dirty-limit
    model_edges = {s: world.EDGES[s] | world.SERIES_EDGES.get(s, set())
                   for s in world.EDGES}
    if not edges['ready'] & world.SERIES_EDGES['ready']:
        model_edges = world.EDGES       # a tree without the series
    out = table_differences('JobSTT', model_edges, edges)
    out += table_differences('JobVerbTable', world.VERB_TABLE, verbs)
    for ours, path, define, factor in CONSTANTS:
        value = define_value(read(tree, path), define)
        model = getattr(world, ours)
        if value is None or abs(value * factor - model) > 1e-9:
            out.append(f'{ours} = {model}, {path} {define} = {value}')
    for path, line in IMITATED:
        if line not in read(tree, path):
            out.append(f'{path} no longer has "{line}"')
    return out
