#!/usr/bin/env python3
"""Stateful stress test of mirror jobs: random schedules of faults and QMP
commands (Hypothesis), invariants after every step, shrunk reproductions,
and every failure replayed on the stock build to tell ours from QEMU's.

    stress.py run    [options]          search (make stress)
    stress.py replay FILE [options]     one recorded schedule (REPLAY=file)
    stress.py ci     [options]          the fixed slice of make check (TAP)

Options: --build DIR (under test), --stock DIR, --python DIR (build/qemu/
python), --out DIR (build/stress), --time SECONDS, --examples N, --seed N.
See README.md, "Stress testing".
"""

import argparse
import atexit
import glob
import json
import os
import shutil
import signal
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, '..', 'pylib')]

# The CI slice of `make check`: its seed and size, in one place.  About
# 3.5 minutes on 2 busy cores, shrinking included; the corpus
# (tests/stress/corpus/) is replayed first.
CI_SEED = 12
CI_EXAMPLES = 24
CI_SHRINK_SECONDS = 30

STEPS_PER_EXAMPLE = 20     # Hypothesis' stateful_step_count
SHRINK_SECONDS = 300       # per failure found, in a search run
CORPUS = os.path.join(HERE, 'corpus')

# Kinds of violation where the series claims to do better than stock: a
# failure there counts even if stock fails too
SERIES_CLAIMS = ('1-qmp-timeout-spinning', '3-cancel-late',
                 '3-force-cancel-late', '3-quit-late', '4-busy-loop',
                 '4-event-storm')


def log_to(path):
    f = open(path, 'a', buffering=1)
    return lambda msg: f.write(f'{time.strftime("%H:%M:%S")} {msg}\n')


class Context:
    """What the state machine needs from the run (machine.CONTEXT), and
    the run's results: the shortest schedule seen for each kind"""

    def __init__(self, build, out, log, deadline, shrink_seconds):
        self.build, self.out, self.log = build, out, log
        self.work = tempfile.mkdtemp(prefix='stress-', dir='/dev/shm')
        atexit.register(shutil.rmtree, self.work, True)
        self.deadline, self.shrink_seconds = deadline, shrink_seconds
        self.masked = set()
        self.found = {}            # key -> {'file', 'steps', 'message', ...}
        self.examples = self.steps = 0
        self.shrink_deadline = None
        self._types = {}

    def exception_type(self, key):
        if key not in self._types:
            self._types[key] = type(f'Violation_{key.replace("-", "_")}',
                                    (AssertionError,), {})
        return self._types[key]

    def before_example(self):
        from machine import StopRun
        now = time.monotonic()
        if self.shrink_deadline and now > self.shrink_deadline:
            raise StopRun('shrink time is up')
        if not self.shrink_deadline and now > self.deadline:
            raise StopRun('run time is up')

    def after_example(self, schedule):
        self.examples += 1
        self.steps += len(schedule['steps']) if schedule else 0
        self.log(f'example {self.examples} done, {self.steps} steps so far')

    def record(self, schedule, violation):
        key = violation.key
        self.log(f'VIOLATION {violation}')
        if key in self.masked:
            return
        if not self.shrink_deadline:
            self.shrink_deadline = time.monotonic() + self.shrink_seconds
        best = self.found.get(key)
        steps = schedule['steps']
        if best and len(steps) > best['steps']:
            return
        path = os.path.join(self.out, f'{key}.json')
        with open(path, 'w') as f:
            json.dump({'violation': str(violation), 'key': key,
                       'setup': schedule['setup'], 'steps': steps}, f,
                      indent=1)
        first = best['first_s'] if best else time.monotonic() - START
        self.found[key] = {'file': path, 'steps': len(steps),
                           'message': str(violation), 'first_s': first,
                           'invariant': violation.invariant}


START = time.monotonic()


def hypothesis_settings(examples, database):
    from hypothesis import HealthCheck, settings
    from hypothesis.database import DirectoryBasedExampleDatabase
    return settings(
        max_examples=examples, deadline=None,
        stateful_step_count=STEPS_PER_EXAMPLE,
        database=DirectoryBasedExampleDatabase(database) if database else None,
        suppress_health_check=list(HealthCheck), print_blob=False,
        report_multiple_bugs=True)


def search(ctx, examples, seed, database):
    """Hypothesis rounds until the time or the examples are used up.  A
    round ends with its failures shrunk; the next one masks their kinds,
    so that it looks for other defects"""
    import hypothesis.core
    import machine
    from hypothesis.stateful import run_state_machine_as_test
    machine.CONTEXT = ctx
    rnd = 0
    while ctx.examples < examples and time.monotonic() < ctx.deadline:
        ctx.masked = set(ctx.found)
        ctx.shrink_deadline = None
        # Our seed: the same seed draws the same schedules (what the
        # pytest plugin's --hypothesis-seed does)
        hypothesis.core.global_force_seed = seed + rnd
        before = set(ctx.found)
        ctx.log(f'round {rnd}: seed {seed + rnd}, masked {sorted(ctx.masked)}')
        try:
            run_state_machine_as_test(machine.MirrorStress,
                                      settings=hypothesis_settings(
                                          examples - ctx.examples, database))
            ctx.log(f'round {rnd}: examples used up')
            if set(ctx.found) == before:
                break
        except machine.StopRun as e:
            ctx.log(f'round {rnd} ended: {e}')
        except KeyboardInterrupt:      # ^C, SIGTERM
            raise
        except BaseException as e:
            # The failures found (ctx.found has them), or Flaky: a failure
            # that depends on timing and did not repeat
            ctx.log(f'round {rnd} ended: {type(e).__name__}: '
                    f'{str(e)[:300]}')
        rnd += 1


def replay(schedule, build, work, log, claims=None):
    """Run a recorded schedule on build; the first violation, or None.
    claims: hold the build to the series' promises (default: if it has
    the series)"""
    import world
    w = None
    try:
        w = world.World(build, work, schedule['setup'], log, claims)
        for step in schedule['steps']:
            if step['op'] == 'quit':
                w.finish()
            else:
                w.run(step)
        return None
    except world.Violation as v:
        return v
    finally:
        if w:
            w.close()


def dropped_on_stock(schedule):
    """What of the schedule a build without the series leaves out"""
    from world import SERIES_OPTIONS
    opts = [k for k in schedule['setup']['mirror'] if k in SERIES_OPTIONS]
    steps = [i for i, s in enumerate(schedule['steps'])
             if s['op'] == 'change' and s['field'] in SERIES_OPTIONS]
    return opts, steps


def classify(key, path, args, work, log):
    """Replay a failure on the build under test and on stock"""
    with open(path) as f:
        schedule = json.load(f)
    again = replay(schedule, args.build, work, log)
    result = {'reproduced': bool(again and again.key == key)}
    if not args.stock or not os.path.exists(
            f'{args.stock}/qemu-system-x86_64'):
        result['class'] = 'unclassified (no stock build)'
        return result
    # Where the series makes a promise, see whether stock breaks it too
    stock = replay(schedule, args.stock, work, log, claims=True)
    opts, steps = dropped_on_stock(schedule)
    result['stock'] = str(stock) if stock else 'passes'
    result['stock_dropped'] = {'mirror options': opts, 'change steps': steps}
    if stock and stock.key == key:
        result['class'] = ('pre-existing, but the series claims to fix it'
                           if key in SERIES_CLAIMS else 'pre-existing')
    else:
        result['class'] = 'regression'
    return result


def counts_as_failure(result):
    """Only what stock QEMU does as well, and the series does not claim
    to fix, is listed without failing; so is what did not happen again
    when replayed (a matter of timing, not a reproduction)"""
    return result['class'] != 'pre-existing' and result['reproduced']


def report(ctx, results, args, minutes, path):
    lines = [f'# Stress run: {args.build}', '',
             f'{ctx.examples} schedules, {ctx.steps} steps, '
             f'{minutes:.1f} minutes, seed {args.seed}; stock build '
             f'{args.stock or "-"}.', '']
    by_inv = {}
    for key, f in ctx.found.items():
        by_inv.setdefault(f['invariant'], []).append(key)
    lines.append('Violations by invariant: ' + (', '.join(
        f'{inv}: {len(keys)}' for inv, keys in sorted(by_inv.items()))
        or 'none') + '.')
    for key, f in sorted(ctx.found.items(), key=lambda kv: kv[1]['first_s']):
        r = results[key]
        lines += ['', f'## {key}: {r["class"]}', '',
                  f'- first seen after {f["first_s"]:.0f} s; shrunk to '
                  f'{f["steps"]} steps: `make stress REPLAY={f["file"]}`',
                  f'- {f["message"]}',
                  f'- reproduced on replay: {"yes" if r["reproduced"] else "no"}',
                  f'- stock: {r.get("stock", "-")}']
        dropped = r.get('stock_dropped')
        if dropped and (dropped['mirror options'] or dropped['change steps']):
            lines.append(f'- on stock, dropped the series-only mirror '
                         f'options {dropped["mirror options"]} and change '
                         f'steps {dropped["change steps"]}')
    text = '\n'.join(lines) + '\n'
    with open(path, 'w') as f:
        f.write(text)
    with open(path.replace('.md', '.json'), 'w') as f:
        json.dump({'examples': ctx.examples, 'steps': ctx.steps,
                   'minutes': minutes, 'found': ctx.found,
                   'classified': results}, f, indent=1)
    return text


def cmd_run(args):
    run_dir = os.path.join(args.out, time.strftime('run-%Y%m%d-%H%M%S'))
    os.makedirs(run_dir, exist_ok=True)
    log = log_to(os.path.join(run_dir, 'log.txt'))
    examples = args.examples or 10 ** 9
    budget = args.time or (None if args.examples else 600)
    deadline = time.monotonic() + (budget or 10 ** 9)
    ctx = Context(args.build, run_dir, log, deadline, args.shrink)
    print(f'stress: {args.build}, {budget or "no"} s time budget, '
          f'{args.examples or "unlimited"} examples, seed {args.seed}; '
          f'log {run_dir}/log.txt', flush=True)
    search(ctx, examples, args.seed, os.path.join(args.out, 'db'))
    results = {key: classify(key, f['file'], args, ctx.work, log)
               for key, f in ctx.found.items()}
    text = report(ctx, results, args, (time.monotonic() - START) / 60,
                  os.path.join(run_dir, 'report.md'))
    shutil.copy(os.path.join(run_dir, 'report.md'),
                os.path.join(args.out, 'report.md'))
    print(text)
    return 1 if any(counts_as_failure(r) for r in results.values()) else 0


def cmd_replay(args):
    with open(args.file) as f:
        schedule = json.load(f)
    work = tempfile.mkdtemp(prefix='stress-', dir='/dev/shm')
    try:
        for build in [args.build] + ([args.stock] if args.stock else []):
            print(f'replay {args.file} on {build}:', flush=True)
            v = replay(schedule, build, work, print)
            print(f'  {v or "no violation"}')
            if build == args.build and not v:
                return 0
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


def cmd_ci(args):
    """TAP: the corpus replayed, then the fixed-seed slice"""
    out = os.path.join(args.out, 'ci')
    os.makedirs(out, exist_ok=True)
    log = log_to(os.path.join(out, 'log.txt'))
    work = tempfile.mkdtemp(prefix='stress-', dir='/dev/shm')
    atexit.register(shutil.rmtree, work, True)
    for path in sorted(glob.glob(os.path.join(CORPUS, '*.json'))):
        with open(path) as f:
            schedule = json.load(f)
        v = replay(schedule, args.build, work, log)
        name = os.path.basename(path)
        print(f'ok - stress corpus {name}' if not v else
              f'not ok - stress corpus {name}: {v}', flush=True)
    ctx = Context(args.build, out, log, time.monotonic() + 10 ** 9,
                  CI_SHRINK_SECONDS)
    search(ctx, CI_EXAMPLES, CI_SEED, None)
    results = {key: classify(key, f['file'], args, work, log)
               for key, f in ctx.found.items()}
    report(ctx, results, args, (time.monotonic() - START) / 60,
           os.path.join(out, 'report.md'))
    for key, r in results.items():
        f = ctx.found[key]
        what = f'stress slice (seed {CI_SEED}): {key} {r["class"]}: ' \
               f'{f["message"][:200]} (reproduction {f["file"]})'
        print(f'not ok - {what}' if counts_as_failure(r) else
              f'ok - {what} # pre-existing, listed')
    print(f'ok - stress slice (seed {CI_SEED}): {ctx.examples} schedules, '
          f'{ctx.steps} steps' if not any(map(counts_as_failure,
                                              results.values())) else
          f'not ok - stress slice (seed {CI_SEED}): {ctx.examples} '
          f'schedules, {ctx.steps} steps, regressions found')


def terminated(*_):
    # Hypothesis takes SystemExit for a failure of the example: only
    # KeyboardInterrupt ends the run
    raise KeyboardInterrupt('SIGTERM')


def main():
    from qemu_procs import kill_all_started
    atexit.register(kill_all_started)
    signal.signal(signal.SIGTERM, terminated)
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('command', choices=['run', 'replay', 'ci'])
    p.add_argument('file', nargs='?')
    p.add_argument('--build', required=True)
    p.add_argument('--stock')
    p.add_argument('--python', required=True)
    p.add_argument('--out', required=True)
    p.add_argument('--time', type=float)
    p.add_argument('--examples', type=int)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--shrink', type=float, default=SHRINK_SECONDS)
    args = p.parse_args()
    sys.path.insert(0, args.python)
    args.build = os.path.abspath(args.build)
    args.stock = args.stock and os.path.abspath(args.stock)
    os.makedirs(args.out, exist_ok=True)
    sys.exit({'run': cmd_run, 'replay': cmd_replay,
              'ci': cmd_ci}[args.command](args) or 0)


if __name__ == '__main__':
    main()
