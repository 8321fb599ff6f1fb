#!/usr/bin/env python3
"""Stateful stress test of mirror jobs: random schedules of faults and QMP
commands (Hypothesis), invariants after every step, shrunk reproductions,
and every failure replayed on the stock build to tell ours from QEMU's.

    stress.py run    [options]          search (make stress)
    stress.py replay FILE [options]     one recorded schedule (REPLAY=file)
    stress.py ci     [options]          the fixed slice of make check (TAP)
    stress.py check-model [options]     the model against QEMU's source

Options: --build DIR (under test), --stock DIR, --python DIR (build/qemu/
python), --tree DIR (QEMU's source, default: the parent of --python), --out
DIR (build/stress), --time SECONDS, --examples N, --seed N, --shrink
SECONDS, --hard-limit SECONDS.  See README.md, "Stress testing".
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
import threading
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, '..', 'pylib')]

# The CI slice of `make check`: its seed and size, in one place.  About
# 4 minutes on 2 busy cores: the model check, the self-test, the must-fail
# schedules (tests/stress/must-fail/) and the corpus (tests/stress/corpus/)
# take 1.5 of them, the seed's schedules 2 (2.5 if one has to be shrunk).
# The whole of it is killed after CI_TIME_LIMIT, whatever it is doing, so
# that CI never hangs on it.
CI_SEED = 12
CI_EXAMPLES = 16
CI_SHRINK_SECONDS = 30
CI_TIME_LIMIT = 600

STEPS_PER_EXAMPLE = 20     # Hypothesis' stateful_step_count
REPLAYS = 3                # tries of a failure on each build to classify it
SHRINK_SECONDS = 300       # per round that found failures, in a search run
CORPUS = os.path.join(HERE, 'corpus')
# Schedules that must break an invariant on any build: each proves that
# its check can fire ("expect": the kind of violation)
MUST_FAIL = os.path.join(HERE, 'must-fail')

# Kinds of violation where the series claims to do better than stock: a
# failure there counts even if stock fails too.  A QMP timeout is one: the
# bound of every command is what the series promises (world.py)
SERIES_CLAIMS = ('1-qmp-timeout', '1-qmp-timeout-spinning', '3-cancel-late',
                 '3-force-cancel-late', '3-quit-late', '4-busy-loop',
                 '4-event-storm')

START = time.monotonic()
WORK_DIRS = []


def work_dir():
    """A directory on /dev/shm for the schedules' files, removed at exit
    (or, if this process is killed, by the next run: see
    remove_dead_runs_work_dirs())"""
    path = tempfile.mkdtemp(prefix=f'stress-{os.getpid()}-', dir='/dev/shm')
    WORK_DIRS.append(path)
    atexit.register(shutil.rmtree, path, True)
    return path


def remove_dead_runs_work_dirs():
    """The work directories of runs that were killed (their process is
    gone; their QEMUs died with them, PR_SET_PDEATHSIG)"""
    for path in glob.glob('/dev/shm/stress-*-*'):
        pid = os.path.basename(path).split('-')[1]
        if pid.isdigit() and not os.path.exists(f'/proc/{pid}'):
            shutil.rmtree(path, ignore_errors=True)


def log_to(path):
    f = open(path, 'a', buffering=1)
    return lambda msg: f.write(f'{time.strftime("%H:%M:%S")} {msg}\n')


def save_json(path, data):
    with open(path, 'w') as f:
        json.dump(data, f, indent=1)


class Context:
    """What the state machine needs from the run (machine.CONTEXT), and
    the run's results: the shortest schedule seen for each signature of
    violation, the waits that nothing bounds, and the tool's own errors"""

    def __init__(self, build, out, log, deadline, shrink_seconds):
        self.build, self.out, self.log = build, out, log
        self.work = work_dir()
        self.deadline, self.shrink_seconds = deadline, shrink_seconds
        self.masked = set()
        self.found = {}            # signature -> {'file', 'steps', ...}
        self.unbounded = {}        # signature -> {'count', 'message', ...}
        self.tool_errors = []      # {'traceback', 'file'}
        self.coverage = {}         # world.COVERAGE at the end of the search
        self.examples = self.steps = self.steps_drawn = 0
        self.shrink_deadline = None
        self._types = {}

    def exception_type(self, signature):
        if signature not in self._types:
            name = ''.join(c if c.isalnum() else '_' for c in signature)
            self._types[signature] = type(f'Violation_{name}',
                                          (AssertionError,), {})
        return self._types[signature]

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
        """A violation; the shortest schedule of each signature is kept"""
        sig = violation.signature
        self.log(f'VIOLATION {violation} [{sig}]')
        if sig in self.masked:
            return
        if not self.shrink_deadline:
            self.shrink_deadline = time.monotonic() + self.shrink_seconds
        best = self.found.get(sig)
        if best:
            best['seen'] += 1
        steps = schedule['steps']
        if best and len(steps) > best['steps']:
            return
        path = os.path.join(self.out, f'{sig}.json')
        save_json(path, {'violation': str(violation), 'key': violation.key,
                         'signature': sig, 'setup': schedule['setup'],
                         'steps': steps})
        self.found[sig] = {
            'file': path, 'steps': len(steps), 'message': str(violation),
            'first_s': best['first_s'] if best else time.monotonic() - START,
            'invariant': violation.invariant, 'key': violation.key,
            'seen': best['seen'] if best else 1}

    def record_unbounded(self, schedule, unbounded):
        """A wait that nothing bounds ended a schedule: counted, and the
        shortest schedule of each kind kept"""
        sig = unbounded.signature
        self.log(f'UNBOUNDED {unbounded} [{sig}]')
        seen = self.unbounded.setdefault(sig, {'count': 0, 'steps': None})
        seen['count'] += 1
        if seen['steps'] is None or len(schedule['steps']) < seen['steps']:
            path = os.path.join(self.out, f'{sig}.json')
            save_json(path, {'unbounded': str(unbounded),
                             'setup': schedule['setup'],
                             'steps': schedule['steps']})
            seen.update(steps=len(schedule['steps']), file=path,
                        message=str(unbounded))

    def record_tool_error(self, schedule, trace):
        """An exception of the tester itself (not a violation): logged with
        its traceback and the schedule; it fails the run"""
        self.log(f'TOOL ERROR\n{trace}')
        path = None
        if schedule and schedule.get('setup'):
            path = os.path.join(self.out,
                                f'tool-error-{len(self.tool_errors)}.json')
            save_json(path, {'tool_error': trace, 'setup': schedule['setup'],
                             'steps': schedule['steps']})
        self.tool_errors.append({'traceback': trace, 'file': path})


def hypothesis_settings(examples, database):
    from hypothesis import HealthCheck, settings
    from hypothesis.database import DirectoryBasedExampleDatabase
    return settings(
        max_examples=examples, deadline=None,
        stateful_step_count=STEPS_PER_EXAMPLE,
        database=DirectoryBasedExampleDatabase(database) if database else None,
        suppress_health_check=list(HealthCheck), print_blob=False,
        report_multiple_bugs=True)


def only_violations(error, ctx):
    """Whether what Hypothesis raised is the violations it found (one, a
    group, or Flaky: one that depends on timing and did not repeat)"""
    from hypothesis.errors import Flaky
    if isinstance(error, BaseExceptionGroup):
        return all(only_violations(e, ctx) for e in error.exceptions)
    return isinstance(error, Flaky) or type(error) in ctx._types.values()


def search(ctx, examples, seed, database):
    """Hypothesis rounds until the time or the examples are used up.  A
    round ends with its failures shrunk.  The next one masks their
    signatures (a kind of violation and where it showed): Hypothesis would
    otherwise find and shrink the same ones again (its database replays
    them first) instead of looking for others, while a violation of the
    same kind elsewhere is still reported"""
    import hypothesis.core
    import machine
    import world
    from hypothesis.stateful import run_state_machine_as_test
    machine.CONTEXT = ctx
    world.COVERAGE.clear()         # what the self-test and replays counted
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
            if only_violations(e, ctx):
                ctx.log(f'round {rnd} ended: {type(e).__name__}: '
                        f'{str(e)[:300]}')
            else:
                ctx.record_tool_error(None, traceback.format_exc())
        rnd += 1


def replay(schedule, build, work, log, claims=None):
    """Run a recorded schedule on build: its first violation, an Unbounded
    if a wait that nothing bounds ended it, or None.  claims: hold the
    build to the series' promises (default: if it has the series).  A
    schedule with unknown steps raises world.ScheduleError at once."""
    import world
    world.check_schedule(schedule)
    w = None
    try:
        w = world.World(build, work, schedule['setup'], log, claims)
        for step in schedule['steps']:
            if step['op'] == 'quit':
                w.finish()
            else:
                w.run(step)
        return None
    except (world.Violation, world.Unbounded) as outcome:
        return outcome
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


def same_kind(outcome, key):
    import world
    return isinstance(outcome, world.Violation) and outcome.key == key


def replay_until(schedule, build, ctx, key, claims=None):
    """Replay up to REPLAYS times, until the violation of kind key shows:
    (its outcome or the last one, how many replays)"""
    for n in range(1, REPLAYS + 1):
        outcome = replay(schedule, build, ctx.work, ctx.log, claims)
        if same_kind(outcome, key):
            break
    return outcome, n


def classify(ctx, found, args):
    """Replay a failure on the build under test and on stock.  A violation
    that depends on timing may not show again: each side gets REPLAYS
    tries"""
    key = found['key']
    with open(found['file']) as f:
        schedule = json.load(f)
    try:
        again, n = replay_until(schedule, args.build, ctx, key)
        result = {'reproduced': same_kind(again, key),
                  'again': f'{again or "passes"} (replay {n})'}
        if not args.stock or not os.path.exists(
                f'{args.stock}/qemu-system-x86_64'):
            result['class'] = 'unclassified (no stock build)'
            return result
        # Where the series makes a promise, see whether stock breaks it too
        stock, n = replay_until(schedule, args.stock, ctx, key, claims=True)
    except Exception:
        ctx.record_tool_error(schedule, traceback.format_exc())
        return {'reproduced': False, 'class': 'tool error while replaying'}
    import world
    opts, steps = dropped_on_stock(schedule)
    result['stock'] = f'{stock or "passes"} (replay {n})'
    result['stock_dropped'] = {'mirror options': opts, 'change steps': steps}
    if same_kind(stock, key):
        result['class'] = ('pre-existing, but the series claims to fix it'
                           if key in SERIES_CLAIMS else 'pre-existing')
    elif isinstance(stock, world.Unbounded):
        # Stock hung where nothing bounds the wait before it got as far:
        # nothing tells that the violation is QEMU's own
        result['class'] = 'unclassified: stock reached no verdict'
    else:
        result['class'] = 'regression'
    if not result['reproduced']:
        result['class'] += f' (not reproduced in {REPLAYS} replays: timing)'
    return result


def counts_as_failure(result):
    """Only what stock QEMU does as well, and the series does not claim
    to fix, is listed without failing.  A violation that did not show
    again when replayed still fails the run: it was seen"""
    return not result['class'].startswith('pre-existing') or \
        result['class'].startswith('pre-existing, but')


def counts_line(ctx):
    """The run's size: schedules and steps drawn are the same for a seed;
    the steps performed are fewer when a violation or an unbounded wait
    ended a schedule early (timing)"""
    unbounded = sum(u['count'] for u in ctx.unbounded.values())
    return (f'{ctx.examples} schedules, {ctx.steps_drawn} steps drawn, '
            f'{ctx.steps} performed, {unbounded} schedules ended by an '
            f'unbounded wait')


def report(ctx, results, args, path):
    minutes = (time.monotonic() - START) / 60
    lines = [f'# Stress run: {args.build}', '',
             f'{counts_line(ctx)}; {minutes:.1f} minutes, seed {args.seed}; '
             f'stock build {args.stock or "-"}.', '']
    by_inv = {}
    for f in ctx.found.values():
        by_inv.setdefault(f['invariant'], []).append(f)
    lines.append('Violations by invariant (distinct signatures, kinds): ' +
                 (', '.join(f'{inv}: {len(fs)} ({len({f["key"] for f in fs})}'
                            f' kinds)' for inv, fs in sorted(by_inv.items()))
                  or 'none') + '.')
    for sig, f in sorted(ctx.found.items(), key=lambda kv: kv[1]['first_s']):
        r = results[sig]
        lines += ['', f'## {sig}: {r["class"]}', '',
                  f'- first seen after {f["first_s"]:.0f} s, {f["seen"]} '
                  f'times (shrinking included); shrunk to {f["steps"]} '
                  f'steps: `make stress REPLAY={f["file"]}`',
                  f'- {f["message"]}',
                  f'- reproduced on replay: '
                  f'{"yes" if r["reproduced"] else "no"} '
                  f'({r.get("again", "-")})',
                  f'- stock: {r.get("stock", "-")}']
        dropped = r.get('stock_dropped')
        if dropped and (dropped['mirror options'] or dropped['change steps']):
            lines.append(f'- on stock, dropped the series-only mirror '
                         f'options {dropped["mirror options"]} and change '
                         f'steps {dropped["change steps"]}')
    lines += ['', '## Coverage: checks made and situations met', '',
              'Over every schedule of the search (replays not counted).', '']
    lines += [f'- {what}: {n}' for what, n in sorted(ctx.coverage.items())]
    if ctx.unbounded:
        lines += ['', '## Waits that nothing bounds (no verdict)', '']
        lines += [f'- {sig}: {u["count"]} schedules, e.g. {u["message"]} '
                  f'({u["file"]})' for sig, u in sorted(ctx.unbounded.items())]
    if ctx.tool_errors:
        lines += ['', f'## Errors of the tester: {len(ctx.tool_errors)}', '']
        for e in ctx.tool_errors:
            lines += [f'- schedule: {e["file"] or "-"}', '', '```',
                      e['traceback'].rstrip(), '```', '']
    text = '\n'.join(lines) + '\n'
    with open(path, 'w') as f:
        f.write(text)
    save_json(path.replace('.md', '.json'), {
        'examples': ctx.examples, 'steps': ctx.steps,
        'steps_drawn': ctx.steps_drawn, 'minutes': minutes,
        'found': ctx.found, 'classified': results,
        'unbounded': ctx.unbounded, 'tool_errors': ctx.tool_errors,
        'coverage': ctx.coverage})
    return text


def classify_all(ctx, args):
    import world
    ctx.coverage = dict(world.COVERAGE)     # the search's, not the replays'
    return {sig: classify(ctx, f, args) for sig, f in ctx.found.items()}


def hard_exit(message, status):
    """Print message, kill every process this one started, remove the work
    directories and exit at once, whatever the main thread is doing"""
    import qemu_procs
    print(message, flush=True)
    for proc in list(qemu_procs.STARTED):
        if proc.returncode is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
    for path in WORK_DIRS:
        shutil.rmtree(path, ignore_errors=True)
    os._exit(status)


def after(seconds, action, *args):
    """action(*args) in a thread after `seconds` (the main thread may be
    stuck anywhere meanwhile)"""
    timer = threading.Timer(seconds, action, args)
    timer.daemon = True
    timer.start()


def hard_time_limit(seconds, what):
    """End this process and everything it started after `seconds`"""
    after(seconds, hard_exit, f'not ok - {what}: hard time limit of '
          f'{seconds:.0f} s exceeded, killed', 124)


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
    results = classify_all(ctx, args)
    text = report(ctx, results, args, os.path.join(run_dir, 'report.md'))
    shutil.copy(os.path.join(run_dir, 'report.md'),
                os.path.join(args.out, 'report.md'))
    print(text)
    return 1 if ctx.tool_errors or any(
        counts_as_failure(r) for r in results.values()) else 0


def load_schedule(path):
    import world
    with open(path) as f:
        schedule = json.load(f)
    world.check_schedule(schedule)
    return schedule


def cmd_replay(args):
    import world
    try:
        schedule = load_schedule(args.file)
    except world.ScheduleError as e:
        print(f'{args.file}: {e}', file=sys.stderr)
        return 2
    work = work_dir()
    print(f'replay {args.file} on {args.build}:', flush=True)
    outcome = replay(schedule, args.build, work, print)
    print(f'  {outcome or "no violation"}')
    if not isinstance(outcome, world.Violation):
        return 0
    if args.stock:
        print(f'replay {args.file} on {args.stock}:', flush=True)
        stock = replay(schedule, args.stock, work, print, claims=True)
        print(f'  {stock or "no violation"}')
        print('=> ' + ('regression: stock passes' if not same_kind(
            stock, outcome.key) else 'pre-existing, but the series claims '
            'to fix it' if outcome.key in SERIES_CLAIMS else
            'pre-existing: stock fails the same way'))
    return 1


def tap_model_check(tree):
    """One TAP line: the model's tables and constants against QEMU's"""
    import model_check
    if not os.path.exists(os.path.join(tree, 'job.c')):
        print(f'ok - stress model matches QEMU # SKIP no source in {tree}')
        return
    diffs = model_check.differences(tree)
    print(f'ok - stress model matches {tree} (job tables, bounds)'
          if not diffs else f'not ok - stress model differs from {tree}: '
          + '; '.join(diffs), flush=True)


def tap_self_test(build):
    """TAP: every check of world.py fires on a situation made to break it"""
    import self_test
    for name, ok, what in self_test.run(build):
        print(f'{"ok" if ok else "not ok"} - stress self-test: {name}: '
              f'{what}', flush=True)


def tap_replays(args, work, log):
    """TAP: every must-fail schedule breaks its invariant on the build it
    names (the build under test, or stock held to the series' promises:
    then the build under test must pass it, too), every corpus
    reproduction passes"""
    import world
    cases = []
    for path in sorted(glob.glob(f'{MUST_FAIL}/*.json')):
        on_stock = load_schedule(path).get('build') == 'stock'
        cases.append((path, 'stock' if on_stock else 'build', True))
        if on_stock:
            cases.append((path, 'build', False))
    cases += [(p, 'build', False) for p in sorted(glob.glob(f'{CORPUS}/*.json'))]
    for path, which, must_fail in cases:
        name = f'{os.path.relpath(path, HERE)} on {which}'
        if which == 'stock' and not args.stock:
            print(f'ok - stress {name} # SKIP no stock build')
            continue
        try:
            schedule = load_schedule(path)
            outcome = replay(schedule, args.stock, work, log, claims=True) \
                if which == 'stock' else \
                replay(schedule, args.build, work, log)
        except Exception:
            print(f'not ok - stress {name}: error of the tester\n'
                  f'{traceback.format_exc()}', flush=True)
            continue
        if must_fail:
            ok = same_kind(outcome, schedule['expect'])
            what = f'fires {schedule["expect"]}' if ok else \
                f'expected {schedule["expect"]}, got {outcome or "none"}'
        else:
            ok = not isinstance(outcome, world.Violation)
            what = str(outcome) if not ok else \
                f'no violation, but no verdict: {outcome}' if outcome \
                else 'passes'

        print(f'{"ok" if ok else "not ok"} - stress {name}: {what}',
              flush=True)


def cmd_ci(args):
    """TAP: the model check, the must-fail schedules, the corpus replayed,
    then the fixed-seed slice"""
    hard_time_limit(args.hard_limit or CI_TIME_LIMIT, 'stress slice')
    out = os.path.join(args.out, 'ci')
    os.makedirs(out, exist_ok=True)
    log = log_to(os.path.join(out, 'log.txt'))
    tap_model_check(args.tree)
    tap_self_test(args.build)
    ctx = Context(args.build, out, log, time.monotonic() + 10 ** 9,
                  CI_SHRINK_SECONDS)
    tap_replays(args, ctx.work, log)
    search(ctx, CI_EXAMPLES, CI_SEED, None)
    results = classify_all(ctx, args)
    args.seed = CI_SEED
    report(ctx, results, args, os.path.join(out, 'report.md'))
    for sig, r in results.items():
        f = ctx.found[sig]
        what = f'stress slice (seed {CI_SEED}): {sig} {r["class"]}: ' \
               f'{f["message"][:200]} (reproduction {f["file"]})'
        print(f'not ok - {what}' if counts_as_failure(r) else
              f'ok - {what} # pre-existing, listed')
    for e in ctx.tool_errors:
        print(f'not ok - stress slice: error of the tester (schedule '
              f'{e["file"] or "-"}):\n{e["traceback"]}')
    failed = ctx.tool_errors or any(map(counts_as_failure, results.values()))
    print(f'{"not ok" if failed else "ok"} - stress slice (seed {CI_SEED}): '
          f'{counts_line(ctx)}; report {out}/report.md', flush=True)


def cmd_check_model(args):
    import model_check
    diffs = model_check.differences(args.tree)
    print('\n'.join(diffs) or f'the model matches {args.tree}')
    return 1 if diffs else 0


# After a SIGTERM, the run gets this long to end by itself (report
# included), then it is ended the hard way
TERM_GRACE = 30


def terminated(*_):
    # Hypothesis takes SystemExit for a failure of the example: only
    # KeyboardInterrupt ends the run.  The QMP library may swallow it (a
    # QMP connection it breaks looks like a QEMU that does not answer)
    after(TERM_GRACE, hard_exit, 'stress: SIGTERM: killed', 128 +
          signal.SIGTERM)
    raise KeyboardInterrupt('SIGTERM')


def main():
    from qemu_procs import kill_all_started
    atexit.register(kill_all_started)
    signal.signal(signal.SIGTERM, terminated)
    remove_dead_runs_work_dirs()
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('command', choices=['run', 'replay', 'ci', 'check-model'])
    p.add_argument('file', nargs='?')
    p.add_argument('--build')
    p.add_argument('--stock')
    p.add_argument('--python', required=True)
    p.add_argument('--tree')
    p.add_argument('--out')
    p.add_argument('--time', type=float)
    p.add_argument('--examples', type=int)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--shrink', type=float, default=SHRINK_SECONDS)
    p.add_argument('--hard-limit', type=float)
    args = p.parse_args()
    sys.path.insert(0, args.python)
    args.tree = args.tree or os.path.dirname(os.path.abspath(args.python))
    if args.command != 'check-model':
        if not args.build or not args.out:
            p.error(f'{args.command} needs --build and --out')
        args.build = os.path.abspath(args.build)
        args.stock = args.stock and os.path.abspath(args.stock)
        os.makedirs(args.out, exist_ok=True)
    if args.hard_limit and args.command != 'ci':
        hard_time_limit(args.hard_limit, f'stress {args.command}')
    sys.exit({'run': cmd_run, 'replay': cmd_replay, 'ci': cmd_ci,
              'check-model': cmd_check_model}[args.command](args) or 0)


if __name__ == '__main__':
    main()
