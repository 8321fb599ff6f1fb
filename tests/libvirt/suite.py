#!/usr/bin/env python3
"""Debian's libvirt drives the patched QEMU.

    suite.py WORK_DIR BUILD_DIR QEMU_PYTHON_DIR [CASE...]

Run as an unprivileged user (scripts/check-libvirt.sh sees to that).  It
starts its own libvirtd "session" daemons, each with its own XDG
directories and host UUID, and its own qemu-storage-daemon NBD targets
(tests/pylib/qemu_procs.py), each in a process group of its own that dies
with the suite, and stops them at the end of each case; whatever still
uses WORK_DIR after a case (a QEMU libvirt did not stop) is killed and
fails the case.  Time bounds are derived from the series' promises (see
"Time bounds" below); the last line is "N passed, N failed".

Each daemon logs its QMP traffic (what it sends, the replies and events);
WORK_DIR/logs/CASE/ keeps those logs, and qmp.txt, the traffic of all the
case's daemons in short; the rest of WORK_DIR is removed at the end.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
import uuid

from xml.sax.saxutils import escape

WORK, BUILD = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])
sys.path.insert(0, sys.argv[3])             # QEMU's QMP library
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                '..', 'pylib'))
from qemu_procs import (MiB, STARTED, LogTail, Qmp, QmpTimeout,  # noqa: E402
                        StorageDaemon, die_with_parent, kill_group,
                        kill_process_group, qemu_io_command, qemu_io_failures,
                        start_process, wait_until)

DISK_SIZE = 64 * MiB
QEMU = os.path.join(BUILD, 'qemu-system-x86_64')
QEMU_IMG = os.path.join(BUILD, 'qemu-img')

# Time bounds.  What the series promises for a copy whose target stopped
# answering (README, "What the series changes": stall-timeout, force cancel;
# QEMU's docs/interop/live-block-operations.rst, "Errors, retries and
# cancelling a 'mirror' job"), by default:
GUEST_WRITE_STALL = 5   # a guest write to a write-blocking copy waits this
CANCELLED_STALL = 10    # a request of a soft-cancelled job waits this
NBD_GRACE = 1           # then NBD waits 1 s for replies before it gives up;
#                         a force cancel ends after that second
# A cancelled job on a dead target: 3 retries, after 0.1, 0.2 and 0.4 s
CANCELLED_RETRIES = 0.1 + 0.2 + 0.4
# (A drain, stop or switchover, waits at most 10 s and quit 1 s; no case
# here stops or quits a domain whose target is frozen.)
# libvirt's own: it kills a QEMU with SIGTERM, and SIGKILL 10 s later
# (virProcessKillPainfully); a frozen QEMU dies only of the SIGKILL.
LIBVIRT_KILL_GRACE = 10
# What a noisy, shared 2-core machine adds to any of them (a TCG guest,
# libvirt's polling, scheduling, virsh's start)
SLACK = 3
# Everything without a promise (a copy, a migration, starting libvirtd):
# only that nothing hangs
HANG_GUARD = 60.0


def orphan_reap_time():
    """Seconds that an orphan's zombie lasts here, at most: libvirt
    daemonizes QEMU, and after killing one waits until its PID is gone
    (kill(pid, 0)), which is when init reaps it.  systemd does so at once;
    some VMs' init only every 2 s.  Two orphans in a row: the second dies
    just after init reaped the first, so it waits for a whole round of an
    init that reaps periodically."""
    worst = 0.0
    for _ in range(2):
        # sh exits at once, its child 0.05 s later, an orphan
        pid = int(subprocess.run(['sh', '-c', 'sleep 0.05 & echo $!'],
                                 capture_output=True, text=True,
                                 check=True).stdout)
        stat = f'/proc/{pid}/stat'

        def state():
            try:
                with open(stat) as f:
                    return f.read().rsplit(')', 1)[1].split()[0]
            except OSError:         # gone (reaped)
                return None
        wait_until(lambda: state() in ('Z', None), HANG_GUARD, 0.005)
        died = time.monotonic()
        if not wait_until(lambda: state() is None, HANG_GUARD, 0.005):
            raise RuntimeError(f'orphan {pid} not reaped in {HANG_GUARD} s')
        worst = max(worst, time.monotonic() - died)
    return worst


ORPHAN_REAP = orphan_reap_time()

GUEST_BOUND = GUEST_WRITE_STALL + NBD_GRACE + SLACK        # 9 s
SOFT_CANCEL_BOUND = CANCELLED_STALL + NBD_GRACE + SLACK    # 14 s
FORCE_CANCEL_BOUND = NBD_GRACE + SLACK                     # 4 s
DEAD_TARGET_BOUND = CANCELLED_RETRIES + SLACK              # 3.7 s
# libvirt destroys a frozen QEMU (13 s, + 2 s of reaping on this VM)
KILL_BOUND = LIBVIRT_KILL_GRACE + ORPHAN_REAP + SLACK
# virsh migrate fails once the source's copy ended (a force cancel: 1 s)
# and the destination's libvirt killed its frozen QEMU (10 s, + reaping):
# 14 s (+ 2 s on this VM)
MIGRATION_FAILED_BOUND = (LIBVIRT_KILL_GRACE + ORPHAN_REAP + NBD_GRACE +
                          SLACK)
# When the frozen-destination cases act (domjobabort, destroy): this long
# after the guest's writes started, well before their stall (5 s) fails
# the copy and libvirt fails the migration by itself
ACT_AFTER = 1


class Failure(Exception):
    pass


def secs(x):
    """A bound in seconds, for messages: 14, 3.7"""
    return f'{x:.1f}'.rstrip('0').rstrip('.')


def check(cond, what):
    if not cond:
        raise Failure(what)


def expect(problems, cond, what):
    """check(), but noted in problems and the case goes on, so that one
    run tells all that went wrong"""
    if not cond:
        problems.append(what)
        print(f'  ({what})', flush=True)
    return cond


def wait_for(cond, what, bound=HANG_GUARD):
    check(wait_until(cond, bound, 0.1), f'{what}: not within {secs(bound)} s')


def run(args, timeout=HANG_GUARD, env=None, ok=True):
    """Run a command (in its own process group, killed if the suite dies);
    its CompletedProcess (text).  ok: it must succeed"""
    try:
        p = subprocess.run(args, capture_output=True, text=True,
                           timeout=timeout, env=env, start_new_session=True,
                           preexec_fn=die_with_parent)
    except subprocess.TimeoutExpired as e:
        raise Failure(f'{" ".join(args)}: no answer within {secs(timeout)} s')\
            from e
    if ok and p.returncode != 0:
        raise Failure(f'{" ".join(args)}: {p.stderr.strip()}')
    return p


def make_image(path, pattern=None, size=DISK_SIZE):
    run([QEMU_IMG, 'create', '-q', '-f', 'raw', path, str(size)])
    if pattern is not None:
        run([os.path.join(BUILD, 'qemu-io'), '-f', 'raw', '-c',
             f'write -q -P {pattern} 0 {size}', path])


def identical(a, b):
    return run([QEMU_IMG, 'compare', '-q', '-f', 'raw', '-F', 'raw', a, b],
               ok=False).returncode == 0


class Daemon:
    """A libvirtd session daemon with its own XDG directories (short
    names: libvirt's UNIX socket paths below them must stay short)"""

    count = 0

    def __init__(self):
        Daemon.count += 1
        self.dir = os.path.join(WORK, f'd{Daemon.count}')
        self.env = dict(os.environ)
        for var, sub in (('XDG_CONFIG_HOME', 'c'),
                         ('XDG_CACHE_HOME', 'k'),
                         ('XDG_DATA_HOME', 'd'),
                         ('XDG_RUNTIME_DIR', 'r')):
            self.env[var] = os.path.join(self.dir, sub)
            os.makedirs(self.env[var], mode=0o700, exist_ok=True)
        conf = os.path.join(self.env['XDG_CONFIG_HOME'], 'libvirt')
        os.makedirs(conf, exist_ok=True)
        self.log = os.path.join(self.dir, 'libvirtd.log')
        with open(os.path.join(conf, 'libvirtd.conf'), 'w') as f:
            # Two daemons on one host migrate only if their UUIDs differ.
            # The monitor's debug messages are its QMP traffic.
            f.write(f'host_uuid = "{uuid.uuid4()}"\n'
                    f'log_filters = "1:qemu.qemu_monitor 3:*"\n'
                    f'log_outputs = "1:file:{self.log}"\n')
        with open(os.path.join(conf, 'qemu.conf'), 'w') as f:
            # QEMU's output straight into its log file: that is where
            # qemu-io reports a failed guest write, so it must be there
            # when the HMP reply comes, not whenever virtlogd copies it;
            # and virtlogd would be one more daemon, outside our process
            # groups, that outlives the case by 2 minutes
            f.write('stdio_handler = "file"\n')
        self.sock = os.path.join(self.env['XDG_RUNTIME_DIR'], 'libvirt',
                                 'libvirt-sock')
        self.uri = f'qemu:///session?socket={self.sock}'
        self.proc = start_process(['libvirtd'], env=self.env)
        try:
            wait_for(lambda: self.virsh('list', ok=False).returncode == 0,
                     f'libvirtd in {self.dir} answering')
        except Failure:
            kill_group(self.proc)
            raise

    def virsh(self, *args, timeout=HANG_GUARD, ok=True, quiet=True):
        return run(['virsh'] + (['-q'] if quiet else []) + ['-c', self.uri] +
                   list(args), timeout=timeout, env=self.env, ok=ok)

    def timed(self, *args, bound):
        """virsh, for an assertion on its outcome: (its exit status, None
        if it did not return within bound; its error; seconds it took)"""
        start = time.monotonic()
        try:
            p = self.virsh(*args, timeout=bound, ok=False)
        except Failure as e:
            return None, str(e), time.monotonic() - start
        return p.returncode, p.stderr.strip(), time.monotonic() - start

    def qemu_pid(self, dom):
        """The PID of the domain's QEMU, from libvirt's PID file (under the
        config or the runtime directory, depending on libvirt's version)"""
        path = os.path.join(self.env['XDG_CONFIG_HOME'], 'libvirt', 'qemu',
                            'run', f'{dom}.pid')
        if not os.path.exists(path):
            path = os.path.join(self.env['XDG_RUNTIME_DIR'], 'libvirt',
                                'qemu', 'run', f'{dom}.pid')
        with open(path) as f:
            return int(f.read())

    def qemu_log(self, dom):
        """libvirt's log of the domain's QEMU: its stdout and stderr"""
        return os.path.join(self.env['XDG_CACHE_HOME'], 'libvirt', 'qemu',
                            'log', f'{dom}.log')

    def qemu_logs(self):
        """libvirt's log of each QEMU it ran"""
        logs = os.path.dirname(self.qemu_log('x'))
        return [os.path.join(logs, name) for name in
                (sorted(os.listdir(logs)) if os.path.isdir(logs) else [])]

    def qmp(self):
        """libvirt's QMP traffic with its QEMUs, from the daemon's log:
        [(time, monitor, '>' sent | '<' reply | '!' event, message)], the
        monitors numbered from 1 in the order they appear (libvirt's
        probe of QEMU's capabilities, then the domains)"""
        try:
            with open(self.log, errors='replace') as f:
                text = f.read()
        except OSError:
            return []
        out, monitors = [], {}
        for m in QMP_LINE.finditer(text):
            try:
                msg, _ = json.JSONDecoder().raw_decode(m['msg'])
            except ValueError:
                continue
            mon = monitors.setdefault(m['mon'], len(monitors) + 1)
            out.append((m['time'], mon, QMP_DIRECTION[m['kind']], msg))
        return out

    def show_logs(self):
        """For a failed case: the end of libvirt's QMP traffic and of the
        log of each QEMU it ran"""
        tail = [qmp_text(t) for t in self.qmp()[-40:]]
        print(f'  --- {self.dir}: libvirt QMP traffic (end)', *tail,
              sep='\n  ')
        for path in self.qemu_logs():
            with open(path, errors='replace') as f:
                tail = f.read().splitlines()[-15:]
            print(f'  --- {self.dir}: {os.path.basename(path)} (end)', *tail,
                  sep='\n  ')

    def save_logs(self, dest):
        """The daemon's log and those of its QEMUs, into dest"""
        base = os.path.basename(self.dir)
        for path in [self.log] + self.qemu_logs():
            if os.path.exists(path):
                shutil.copy(path, os.path.join(
                    dest, f'{base}-{os.path.basename(path)}'))

    def stop(self):
        """Destroy the domains (libvirt runs their QEMUs in sessions of
        their own: Case.close kills any it leaves), then libvirtd"""
        try:
            for dom in self.virsh('list', '--name', ok=False,
                                  timeout=SLACK).stdout.split():
                # A frozen QEMU takes libvirt's SIGTERM grace
                self.virsh('destroy', dom, ok=False, timeout=KILL_BOUND)
        finally:
            self.proc.terminate()           # let it remove its files
            try:
                self.proc.wait(SLACK)
            except subprocess.TimeoutExpired:
                pass
            kill_group(self.proc)


class Background:
    """A virsh command left running (virsh migrate) while the case acts,
    in a process group of its own, its output in a file"""

    def __init__(self, daemon, args, out):
        self.out = out
        self.proc = start_process(['virsh', '-q', '-c', daemon.uri] + args,
                                  out, daemon.env)

    def wait(self, bound):
        """Its exit status (None if it did not end within bound), and the
        last line of its output"""
        try:
            self.proc.wait(max(bound, 0))
        except subprocess.TimeoutExpired:
            pass
        with open(self.out, errors='replace') as f:
            lines = f.read().strip().splitlines() or ['']
        return self.proc.poll(), lines[-1]

    def stop(self):
        kill_group(self.proc)


QMP_LINE = re.compile(r'^\d{4}-\d\d-\d\d (?P<time>[\d:.]+)\S*: .*?'
                      r'QEMU_MONITOR_(?P<kind>SEND_MSG|RECV_REPLY|RECV_EVENT)'
                      r': mon=(?P<mon>\S+) (?:msg|reply|event)=(?P<msg>.*)$',
                      re.M)
QMP_DIRECTION = {'SEND_MSG': '>', 'RECV_REPLY': '<', 'RECV_EVENT': '!'}


def qmp_text(entry, width=300):
    """One line of QMP traffic, shortened"""
    when, mon, direction, msg = entry
    text = json.dumps(msg, separators=(',', ':'))
    if len(text) > width:
        text = text[:width] + '...'
    return f'{when} m{mon} {direction} {text}'


def qmp_commands(traffic, mon):
    """The QMP commands sent on one monitor, each once, in order of first
    use"""
    seen = {}
    for _, m, direction, msg in traffic:
        if m == mon and direction == '>' and 'execute' in msg:
            seen.setdefault(msg['execute'], None)
    return list(seen)


def sent_write_blocking_mirror(daemon):
    """Whether libvirt started a copy in write-blocking mode, as its QMP
    traffic shows"""
    return any(direction == '>' and msg.get('execute') == 'blockdev-mirror'
               and msg.get('arguments', {}).get('copy-mode') ==
               'write-blocking'
               for _, _, direction, msg in daemon.qmp())


def nbd_disk_xml(target):
    """libvirt's disk XML for a StorageDaemon's NBD export 't'"""
    path = os.path.join(WORK, 'nbd-target.xml')
    with open(path, 'w') as f:
        f.write(f"""<disk type='network' device='disk'>
  <driver name='qemu' type='raw'/>
  <source protocol='nbd' name='t'>
    <host transport='unix' socket='{escape(target.addr)}'/>
  </source>
</disk>
""")
    return path


def domain_xml(name, uid, imgs, qmp):
    """A transient TCG domain fit for our minimal binary: no USB, no
    balloon, no graphics; ACPI on (without it libvirt passes -no-acpi,
    which QEMU 10 rejects).  A second QMP monitor of our own lets the
    suite write as the guest would while libvirt holds the domain's job
    lock (a migration)."""
    path = os.path.join(WORK, f'{name}.xml')
    with open(path, 'w') as f:
        f.write(f"""<domain type='qemu'
 xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <uuid>{uid}</uuid>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc-i440fx-10.0'>hvm</type></os>
  <features><acpi/></features>
  <devices>
    <emulator>{escape(QEMU)}</emulator>
{''.join(disk_xml(i, img) for i, img in enumerate(imgs))}    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
  <qemu:commandline>
    <qemu:arg value='-qmp'/>
    <qemu:arg value='unix:{escape(qmp)},server=on,wait=off'/>
  </qemu:commandline>
</domain>
""")
    return path


def disk_xml(index, img):
    """vda, vdb, ...: libvirt names their devices virtio-disk0, 1, ..."""
    return f"""    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='{escape(img)}'/>
      <target dev='vd{chr(ord('a') + index)}' bus='virtio'/>
    </disk>
"""


# vda's BlockBackend, where the guest's requests come from
VDA = 'virtio-disk0/virtio-backend'


class Guest:
    """vda as the guest uses it: HMP qemu-io on the virtio-blk device, on
    our own QMP monitor (a second one, so that the suite can write while
    libvirt holds the domain's job lock: a migration), or on libvirt's.

    qemu-io reports a failed request or wrong data read back on QEMU's
    stdout, the domain's log, not in the HMP reply: every check reads the
    log too, and any such report in it fails it."""

    def __init__(self, qmp_path, log_path):
        self.qmp = Qmp(qmp_path, timeout=HANG_GUARD)
        self.qmp.connect()
        self.log = LogTail(log_path)
        self.failed = []

    def hmp(self, line):
        return self.qmp.ok('human-monitor-command', {'command-line': line})

    def failures(self):
        """qemu-io's failure reports in the domain's log so far"""
        self.failed += qemu_io_failures(self.log.read())
        return self.failed

    def qemu_io(self, command, hmp=None):
        """A qemu-io command on vda, through hmp (a function that runs an
        HMP command line and returns the reply; default: our monitor)"""
        reply = (hmp or self.hmp)(qemu_io_command(VDA, command)).strip()
        problems = ([reply] if reply else []) + self.failures()
        check(not problems, f'guest {command}: {"; ".join(problems)}')

    def write(self, pattern, offset, length, hmp=None):
        """Write, and read it back"""
        self.qemu_io(f'write -q -P {pattern} {offset} {length}', hmp)
        self.verify(pattern, offset, length, hmp)

    def verify(self, pattern, offset, length, hmp=None):
        self.qemu_io(f'read -q -P {pattern} {offset} {length}', hmp)

    def aio_write(self, pattern, offset, length):
        """Start a write and return at once, as a guest's request is in
        flight while the guest runs on (a synchronous qemu-io write would
        hold QEMU's main loop, and libvirt's monitor with it, until the
        write completes); writes_complete() tells how it ended"""
        self.qemu_io(f'aio_write -q -P {pattern} {offset} {length}')

    def writes(self, timeout=None):
        """(completed, failed) writes of the guest's disk vda so far"""
        for dev in self.qmp.ok('query-blockstats', timeout=timeout):
            if 'virtio-disk0' in dev.get('qdev', '') + dev.get('device', ''):
                st = dev['stats']
                return st['wr_operations'], st['failed_wr_operations']
        raise Failure('no blockstats for virtio-disk0')

    def jobs(self):
        return self.qmp.ok('query-block-jobs')

    def dirty(self, img):
        """Bytes a copy job has yet to copy from an image: the dirty bitmap
        of the job's filter node above it (the job's own len - offset is
        not updated while the job waits for the target)"""
        for n in self.qmp.ok('query-named-block-nodes'):
            if n['drv'] == 'mirror_top' and n['file'] == img:
                return sum(m['count'] for m in n.get('dirty-bitmaps', []))
        return 0

    def close(self):
        self.qmp.close()        # also when QEMU is gone (migrated, killed)


def writes_complete(g, before, n, bound):
    """Whether n guest writes started after blockstats `before` (and all
    before them) ended within bound, and none failed (in blockstats or in
    the log).  Not if QEMU stops answering our monitor (stock QEMU, on a
    force cancel of a copy to a frozen target): that is noted, and our
    monitor is of no more use."""
    try:
        ended = wait_until(lambda: sum(g.writes(bound + SLACK)) >=
                           sum(before) + n, bound, 0.1)
        return ended and g.writes()[1] == before[1] and not g.failures()
    except QmpTimeout as e:
        print(f'  (QEMU does not answer our monitor: {e})', flush=True)
        return False


def leftovers():
    """Processes of ours, but the suite and its parents, that still use
    WORK (in their command line, or their environment: libvirtd's and
    virsh's XDG directories are there): [(pid, command line)]"""
    family, pid = set(), os.getpid()
    while pid > 1:
        family.add(pid)
        with open(f'/proc/{pid}/stat') as f:
            pid = int(f.read().rsplit(')', 1)[1].split()[1])
    marker = (WORK + '/').encode()
    found = []
    for name in filter(str.isdigit, os.listdir('/proc')):
        try:
            if int(name) in family or \
                    os.stat(f'/proc/{name}').st_uid != os.getuid():
                continue
            with open(f'/proc/{name}/cmdline', 'rb') as f:
                cmdline = f.read()
            with open(f'/proc/{name}/environ', 'rb') as f:
                environ = f.read()
        except OSError:             # gone meanwhile
            continue
        if marker in cmdline or marker in environ:
            found.append((int(name), cmdline.replace(b'\0', b' ')
                          .decode(errors='replace')[:120]))
    return found


def kill_leftovers():
    """Kill what leftovers() finds, each with its process group (libvirt's
    QEMUs lead their own); what it found"""
    found = leftovers()
    for pid, _ in found:
        try:
            kill_process_group(os.getpgid(pid))
        except ProcessLookupError:
            pass
        except ValueError:          # in our group: only the process
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGKILL)
    for proc in list(STARTED):      # reap ours
        kill_group(proc)
    return found


class Case:
    """One test case: a daemon, a running domain on a patterned image,
    and whatever the case adds, all stopped at the end"""

    def __init__(self, name, sizes):
        self.name = name
        self.sizes = sizes
        self.dom = 'lv'
        self.cleanups = []
        self.daemons = []
        self.g = None

    def start(self):
        self.src = self.daemon()
        self.imgs = [os.path.join(WORK, f'{self.name}-source{i}.img')
                     for i in range(len(self.sizes))]
        for img, size in zip(self.imgs, self.sizes):
            make_image(img, pattern=0x11, size=size)
        self.img = self.imgs[0]
        self.qmp = os.path.join(WORK, f'{self.name}-src.qmp')
        self.uuid = str(uuid.uuid4())
        self.src.virsh('create', domain_xml(self.dom, self.uuid, self.imgs,
                                            self.qmp))
        wait_for(lambda: os.path.exists(self.qmp), 'our QMP socket')

    def daemon(self):
        d = Daemon()
        self.daemons.append(d)
        self.cleanups.append(d.stop)
        return d

    def target(self, name='target'):
        """A qemu-storage-daemon exporting a fresh image over NBD"""
        base = os.path.join(WORK, f'{self.name}-{name}')
        make_image(base + '.img')
        t = StorageDaemon(BUILD, base + '.img', base + '.sock',
                          base + '.qmp', base + '.log', fault_node=False)
        self.cleanups.append(t.kill)
        return t

    def background(self, daemon, args):
        b = Background(daemon, args,
                       os.path.join(WORK, f'{self.name}-virsh.out'))
        self.cleanups.append(b.stop)
        return b

    def guest(self):
        """The source domain's Guest (one: our QMP socket takes one
        client)"""
        if self.g is None:
            self.g = Guest(self.qmp, self.src.qemu_log(self.dom))
            self.cleanups.append(self.g.close)
        return self.g

    def libvirt_hmp(self, line):
        return self.src.virsh('qemu-monitor-command', self.dom, '--hmp',
                              line).stdout

    def write_via_libvirt(self, pattern, offset, length):
        """A guest-like write, read back, through libvirt's own monitor"""
        self.guest().write(pattern, offset, length, hmp=self.libvirt_hmp)

    def job(self):
        """virsh blockjob --info of vda: 'Block Copy: [100 %]' (libvirt
        9.0; 11.x: '[100.00 %]'), '' when there is none"""
        p = self.src.virsh('blockjob', self.dom, 'vda', '--info',
                           quiet=False)         # -q hides "No current ..."
        lines = [line.strip() for line in (p.stdout + p.stderr).split('\n')]
        if 'No current block job for vda' in lines:
            return ''
        progress = [line for line in lines if line.startswith('Block ')]
        check(progress, f'virsh blockjob --info: {lines}')
        return progress[0]

    def blockcopy_ready(self, target, *extra):
        self.src.virsh('blockcopy', self.dom, 'vda', '--xml',
                       nbd_disk_xml(target), '--reuse-external',
                       '--transient-job', '--wait', *extra)
        check(self.ready(), f'copy not ready: {self.job()}')

    def ready(self):
        """virsh blockjob --info says the copy of vda is ready"""
        return re.search(r'\[100(\.0+)? %\]', self.job()) is not None

    def close(self, failed):
        """Stop everything; what had to be killed after that (leaked)"""
        if failed:
            for d in self.daemons:
                d.show_logs()
        for fn in reversed(self.cleanups):
            try:
                fn()
            except Exception:       # keep cleaning up
                traceback.print_exc()
        self.save_logs()
        return kill_leftovers()

    def save_logs(self):
        """WORK/logs/CASE: the daemons' logs, and qmp.txt, the QMP traffic
        of all of them in short, with the commands each daemon sent"""
        dest = os.path.join(WORK, 'logs', self.name)
        os.makedirs(dest, exist_ok=True)
        with open(os.path.join(dest, 'qmp.txt'), 'w') as f:
            for d in self.daemons:
                d.save_logs(dest)
                traffic = d.qmp()
                for mon in sorted({t[1] for t in traffic}):
                    f.write(f'=== {os.path.basename(d.dir)} m{mon}: '
                            f'commands sent: '
                            f'{" ".join(qmp_commands(traffic, mon))}\n')
                f.writelines(qmp_text(t, 2000) + '\n' for t in traffic)


# Checks shared by the cases

def returned_ok(problems, what, result):
    """A Daemon.timed() result: the call succeeded within its bound"""
    status, err, took = result
    print(f'  ({what} returned after {took:.1f} s)', flush=True)
    return expect(problems, status == 0, f'{what}: {err}')


def domain_usable(c, problems, pattern, offset):
    """After the copy's end: the domain runs, QEMU answers libvirt's
    monitor, no block job is left, and the guest writes (1 MiB at offset,
    read back) through libvirt's monitor"""
    p = c.src.virsh('domstate', c.dom, ok=False)
    expect(problems, p.stdout.strip() == 'running',
           f'the domain is not running: {(p.stdout + p.stderr).strip()}')
    p = c.src.virsh('qemu-monitor-command', c.dom,
                    '{"execute": "query-status"}', ok=False)
    status = json.loads(p.stdout)['return']['status'] if p.returncode == 0 \
        else p.stderr.strip()
    expect(problems, status == 'running', f'query-status: {status}')
    expect(problems, c.job() == '', 'a block job is left')
    try:
        c.write_via_libvirt(pattern, offset, '1M')
    except Failure as e:
        expect(problems, False, str(e))


def abort_copy(c, bound, problems):
    """virsh blockjob --abort of vda's copy; meanwhile other calls on the
    domain, each must succeed within bound: qemu-monitor-command waits
    for libvirt's job lock, which the abort holds, domblkinfo does not.

    Without --async, libvirt 11.3 (qemuDomainBlockJobAbort in
    src/qemu/qemu_driver.c) sends a soft block-job-cancel, waits until
    QEMU's job has ended and returns success, also when the job ended with
    an error (the target stopped answering): it reports a failed job only
    for --pivot.  So success it must be."""
    aborted = []
    abort = threading.Thread(target=lambda: aborted.append(c.src.timed(
        'blockjob', c.dom, 'vda', '--abort', bound=bound)))
    abort.start()
    try:
        time.sleep(1)               # the abort holds the lock by now
        for call in (('qemu-monitor-command', c.dom, '--hmp', 'info status'),
                     ('domblkinfo', c.dom, 'vda')):
            returned_ok(problems, f'virsh {call[0]} during the abort',
                        c.src.timed(*call, bound=bound))
    finally:
        abort.join()                # virsh's timeout (bound) ends it
    returned_ok(problems, 'virsh blockjob --abort', aborted[0])


# The cases

def case_write_checks(c):
    """The guest-write checks fail when the write does: a write beyond
    the end of vda through libvirt's monitor and through ours, a read-back
    of other data than written, and a failed asynchronous write"""
    g = c.guest()
    c.write_via_libvirt(0x21, 0, '1M')
    g.write(0x22, '1M', '1M')

    def must_fail(what, action):
        try:
            action()
        except Failure as e:
            print(f'  ({what}: noticed: {e})')
            g.failed.clear()        # expected: the next check starts clean
            return
        raise Failure(f'{what}: not noticed')

    must_fail('write beyond the end through libvirt',
              lambda: c.write_via_libvirt(0x23, DISK_SIZE, '1M'))
    must_fail('write beyond the end through our monitor',
              lambda: g.write(0x24, DISK_SIZE, '1M'))
    must_fail('other data read back', lambda: g.verify(0x25, 0, '1M'))
    before = g.writes()
    # Beyond the end, it fails before qemu-io returns: in the log already
    must_fail('asynchronous write beyond the end',
              lambda: g.aio_write(0x26, DISK_SIZE, '1M'))
    check(not writes_complete(g, before, 1, SLACK),     # by blockstats
          'a failed asynchronous write: not in blockstats')


def case_pivot(c):
    """blockcopy to NBD, READY, pivot: the guest runs on the target"""
    t = c.target()
    c.write_via_libvirt(0x22, 0, '1M')
    c.blockcopy_ready(t)
    c.write_via_libvirt(0x33, '8M', '1M')       # mirrored while READY
    c.src.virsh('blockjob', c.dom, 'vda', '--pivot')
    check(c.job() == '', 'a job is left after the pivot')
    blk = c.src.virsh('domblklist', c.dom).stdout
    check(blk.split() == ['vda', 't'],          # the NBD export's name
          f'the guest does not run on the target: {blk}')
    check(identical(c.img, t.img), 'source and target differ')
    c.write_via_libvirt(0x44, '16M', '1M')      # now into the target
    run([os.path.join(BUILD, 'qemu-io'), '-f', 'raw', '-r', '-U', '-c',
         'read -q -P 0x44 16M 1M', t.img])


def case_abort_dead_target(c):
    """blockcopy, target killed after READY, --abort at once: libvirt's
    soft cancel reaches QEMU while the job is still alive (a guest write
    first could make the job fail by itself, on-target-error=report, and
    the abort would then find no job); it returns within the bound of a
    cancelled job on a dead target, the job is gone, and guest writes
    succeed on the guest's own disk"""
    t = c.target()
    c.blockcopy_ready(t)
    t.kill()
    status, err, took = c.src.timed('blockjob', c.dom, 'vda', '--abort',
                                    bound=DEAD_TARGET_BOUND)
    check(status == 0, f'virsh blockjob --abort: {err} ({took:.1f} s)')
    print(f'  (abort returned after {took:.1f} s)')
    wait_for(lambda: c.job() == '', 'the job is gone', DEAD_TARGET_BOUND)
    c.write_via_libvirt(0x66, '1M', '1M')
    check(c.img in c.src.virsh('domblklist', c.dom).stdout,
          'the guest is not on its own disk any more')


def case_abort_frozen_target(c):
    """blockcopy, READY, target frozen (SIGSTOP) while it copies a guest
    write: blockjob --abort (a soft cancel), and other calls on the domain
    meanwhile (abort_copy), succeed within a cancelled job's stall
    timeout; then no job is left, the domain runs and answers, its guest
    writes (with stock QEMU the abort gets no reply, and the calls waiting
    for it none within the bound either)"""
    t = c.target()
    c.blockcopy_ready(t)
    t.stop()                        # SIGSTOP
    c.guest().write(0x77, 0, '4M')  # done on the source; its copy waits
    problems = []
    abort_copy(c, SOFT_CANCEL_BOUND, problems)
    check(not problems, '; '.join(problems))    # the rest needs the abort
    domain_usable(c, problems, 0x78, '4M')
    check(not problems, '; '.join(problems))


def migrate_args(c, dst, qmp, *extra):
    """The destination's own disks, and virsh migrate's arguments"""
    dst_imgs = [os.path.join(WORK, f'{c.name}-dest{i}.img')
                for i in range(len(c.sizes))]
    for img, size in zip(dst_imgs, c.sizes):
        make_image(img, size=size)
    return dst_imgs, ['migrate', '--live', '--copy-storage-all', '--verbose',
                      *extra,
                      '--xml', domain_xml(c.dom, c.uuid, dst_imgs, qmp),
                      '--migrateuri', 'tcp://127.0.0.1',
                      '--disks-uri', 'tcp://127.0.0.1',
                      c.dom, dst.uri]


def case_migrate(c, *extra):
    """migrate --live --copy-storage-all between two session daemons"""
    dst = c.daemon()
    c.write_via_libvirt(0x22, 0, '2M')
    dst_imgs, args = migrate_args(c, dst, os.path.join(WORK, 'mig-dst.qmp'),
                                  *extra)
    c.src.virsh(*args, timeout=HANG_GUARD * 2)
    check(dst.virsh('domstate', c.dom).stdout.strip() == 'running',
          'the domain does not run on the destination')
    check(c.src.virsh('domstate', c.dom, ok=False).returncode != 0,
          'the domain is still on the source')
    check(all(map(identical, c.imgs, dst_imgs)),
          'source and destination disks differ')


def case_migrate_dest_killed(c):
    """The destination QEMU is killed during the storage copy: migrate
    fails within the bound, the source keeps running and writable"""
    dst = c.daemon()
    _, args = migrate_args(c, dst, os.path.join(WORK, 'kill-dst.qmp'))
    # 2 MiB/s: the copy of 64 MiB takes long enough to kill during it.  It
    # goes in bursts of mirror's buffer (16 MiB), 8 s apart: its next
    # burst meets the dead target, whose error fails it (no retries while
    # it runs), but it ends only when the sleep after that burst does
    mib_per_s = 2
    bound = 2 * 16 / mib_per_s + SLACK
    mig = c.background(c.src, args + ['--bandwidth', str(mib_per_s)])
    wait_for(lambda: dst.virsh('domstate', c.dom, ok=False).returncode == 0,
             'the destination domain')
    time.sleep(2)
    os.kill(dst.qemu_pid(c.dom), signal.SIGKILL)
    start = time.monotonic()
    status, last = mig.wait(bound)
    check(status is not None, f'virsh migrate did not return within '
          f'{secs(bound)} s')
    check(status != 0, 'migrate succeeded with a dead destination')
    print(f'  (migrate failed after {time.monotonic() - start:.1f} s: '
          f'{last})')
    problems = []
    domain_usable(c, problems, 0x99, 0)
    check(not problems, '; '.join(problems))


def case_migrate_outpaced(c):
    """Guest writes outpace a slow copy while the copy is READY: libvirt
    still sees 'ready' (the fallback is off unless asked for), its
    migration completes (its soft cancel at pre-switchover still means
    'finish the copy'), and the disks are identical.

    Two disks, and --bandwidth for a slow bulk copy: libvirt starts the
    RAM migration once every copy is ready, so vda (16 MiB) is ready while
    vdb (64 MiB) is still copying; the guest writes to vda in that window.
    The bandwidth alone does not let a READY copy fall behind (a job's
    rate limit lets a burst of a whole iteration through), so the
    destination QEMU is also frozen for the 2 s of writes: a stalled
    network."""
    dst = c.daemon()
    dst_imgs, args = migrate_args(c, dst, os.path.join(WORK, 'slow-dst.qmp'))
    g = c.guest()
    stop = threading.Event()
    written, seen = [], []      # MiB written; vda's (status, bytes behind)
    errors = []                 # the writer's, for the case to raise

    def look():
        for j in g.jobs():
            if j['device'].endswith('virtio-disk0'):
                seen.append((j['status'], g.dirty(c.imgs[0])))
        return seen[-1][0] if seen else None

    def write_while_frozen():
        # Once vda's copy is ready: about 14 MiB/s over all of vda for
        # 2 s, with the destination frozen; then the guest goes quiet, so
        # that the copy can converge.  Only while the guest runs: writes
        # once the source stopped for the switchover would not be a
        # guest's.
        while not stop.is_set() and look() != 'ready':
            time.sleep(0.1)
        dest_qemu = dst.qemu_pid(c.dom)
        os.kill(dest_qemu, signal.SIGSTOP)
        try:
            end = time.monotonic() + 2
            i = 0
            while not stop.is_set() and time.monotonic() < end and \
                    g.qmp.ok('query-status')['running']:
                g.write(0x20 + i % 64, (i % 16) * MiB, '1M')
                written.append(i)
                look()
                i += 1
                time.sleep(0.05)
        finally:
            os.kill(dest_qemu, signal.SIGCONT)

    def writer():
        try:
            write_while_frozen()
        except Exception as e:      # the case reports it
            errors.append(e)
            return
        while not stop.is_set():
            try:
                look()
            except Exception:   # the source QEMU ended: migrated
                return
            time.sleep(0.2)

    w = threading.Thread(target=writer)
    w.start()
    try:
        c.src.virsh(*args, '--bandwidth', '4', timeout=HANG_GUARD * 2)
    finally:
        stop.set()
        w.join()
    check(not errors, f'while the destination was frozen: {errors}')
    statuses = [st for st, _ in seen]
    check('ready' in statuses, f'the copy was never ready: {statuses}')
    after = set(statuses[statuses.index('ready'):])
    check(after <= {'ready', 'standby'},
          f'the job left READY without ready-dirty-limit: {after}')
    behind = max(b for st, b in seen if st == 'ready')
    check(behind >= 4 * MiB, f'the guest never outpaced the copy '
          f'(at most {behind} bytes behind while ready)')
    print(f'  ({len(written)} MiB written while vda was ready, up to '
          f'{behind / MiB:.0f} MiB behind)')
    check(dst.virsh('domstate', c.dom).stdout.strip() == 'running',
          'the domain does not run on the destination')
    check(all(map(identical, c.imgs, dst_imgs)),
          'source and destination disks differ')


def case_migrate_sync(c):
    """migrate --live --copy-storage-all --copy-storage-synchronous-writes
    (the copy in write-blocking mode) between two session daemons, disks
    identical"""
    case_migrate(c, '--copy-storage-synchronous-writes')
    check(sent_write_blocking_mirror(c.src),
          'libvirt did not start the copy in write-blocking mode')


# The guest writes of the frozen-destination cases: (pattern, offset), 1 MiB
# each.  The destination freezes once the copy of vda is under way (it sent
# its first 16 MiB, a part or all of it copied): in a write-blocking copy,
# the write to 0 at least waits for the destination (in our runs: all four)
FROZEN_WRITES = [(0x40 + i, i * 8 * MiB) for i in range(4)]


def frozen_dest_migration(c, stall_timeout=None):
    """migrate --copy-storage-all --copy-storage-synchronous-writes at
    2 MiB/s, the destination QEMU frozen (SIGSTOP) once the copy of vda
    is under way (with stall_timeout: the copy's stall timeout set to it
    first, on our monitor), guest writes started; ACT_AFTER seconds after
    they started, some must still be waiting for the frozen destination
    (else the copy is not write-blocking, and what the case does next,
    its abort or destroy, would not meet a hung copy).  (destination
    daemon, virsh migrate, guest, blockstats before the writes, when they
    started, problems)"""
    dst = c.daemon()
    _, args = migrate_args(c, dst, os.path.join(WORK, f'{c.name}-dst.qmp'),
                           '--copy-storage-synchronous-writes',
                           '--bandwidth', '2')
    mig = c.background(c.src, args)
    g = c.guest()
    wait_for(lambda: any(j['offset'] > 0 for j in g.jobs()),
             'the storage copy under way')
    if stall_timeout is not None:
        try:
            g.qmp.ok('block-job-change', {'id': g.jobs()[0]['device'],
                                          'type': 'mirror',
                                          'stall-timeout': stall_timeout})
        except RuntimeError as e:   # stock: no stall timeout to raise
            print(f'  (stall timeout not set: {e})')
    dest_qemu = dst.qemu_pid(c.dom)
    os.kill(dest_qemu, signal.SIGSTOP)
    c.cleanups.append(lambda: os.kill(dest_qemu, signal.SIGCONT)
                      if os.path.exists(f'/proc/{dest_qemu}') else None)
    before = g.writes()
    started = time.monotonic()
    for pattern, offset in FROZEN_WRITES:
        g.aio_write(pattern, offset, '1M')
    time.sleep(max(0, started + ACT_AFTER - time.monotonic()))
    done = sum(g.writes()) - sum(before)
    print(f'  ({done} of {len(FROZEN_WRITES)} guest writes done '
          f'{secs(ACT_AFTER)} s after they started)')
    check(done < len(FROZEN_WRITES), 'no guest write waits for the frozen '
          'destination')
    return dst, mig, g, before, started, []


def migration_failed(mig, problems, start, reason=''):
    """virsh migrate ended with an error (saying reason) within
    MIGRATION_FAILED_BOUND of start"""
    status, last = mig.wait(MIGRATION_FAILED_BOUND -
                            (time.monotonic() - start))
    if expect(problems, status is not None, f'virsh migrate did not return '
              f'within {secs(MIGRATION_FAILED_BOUND)} s'):
        print(f'  (migrate failed after {time.monotonic() - start:.1f} s: '
              f'{last})')
        expect(problems, status != 0, 'virsh migrate succeeded')
        expect(problems, reason in last,
               f'virsh migrate did not fail with "{reason}": {last}')


def job_ended(g, problems, event, failed=False):
    """The source's copy (the only job) ended with this event (QEMU's
    BLOCK_JOB_CANCELLED or BLOCK_JOB_COMPLETED, seen on our monitor), with
    an error if failed"""
    ev = g.qmp.wait_event({'BLOCK_JOB_CANCELLED', 'BLOCK_JOB_COMPLETED'},
                          SLACK)
    what = ev and f'{ev["event"]} {ev["data"].get("error", "")}'.strip()
    print(f'  (the copy ended: {what})')
    expect(problems, ev is not None and ev['event'] == event and
           (not failed or 'error' in ev['data']),
           f'the copy did not end with {event}'
           f'{" and an error" if failed else ""}: {what}')


def source_runs_on(c, g, before, problems):
    """The source domain runs, without a block job, the guest's writes
    started while the destination was frozen are done and read back, and
    it writes"""
    expect(problems, writes_complete(g, before, len(FROZEN_WRITES), SLACK),
           'the guest writes started while the destination was frozen '
           'did not complete (or failed) after the migration failed')
    domain_usable(c, problems, 0x60, '1M')
    read_back(g, problems, FROZEN_WRITES)


def read_back(g, problems, writes):
    """Each (pattern, offset) of 1 MiB reads back as written"""
    for pattern, offset in writes:
        try:
            g.verify(pattern, offset, '1M')
        except Failure as e:
            expect(problems, False, str(e))


def case_migrate_sync_frozen_abort(c):
    """migrate --copy-storage-synchronous-writes, the destination frozen
    mid-copy, guest writes waiting for it: virsh domjobabort (libvirt
    sends migrate_cancel and a force block-job-cancel) while they wait:
    it returns, the writes complete within a force cancel's bound of the
    abort, the copy ends cancelled, virsh migrate fails as aborted within
    the bound, the source runs on, the writes read back, the guest
    writes, the destination's domain is gone or destroyable.

    Only the force cancel may end the writes: with the default stall of
    a guest write (5 s) they would complete 4 s after the abort anyway,
    just at the bound, and libvirt would fail the migration by itself.
    So the copy's stall timeout is out of reach, HANG_GUARD."""
    dst, mig, g, before, _, problems = frozen_dest_migration(
        c, stall_timeout=int(HANG_GUARD))
    start = time.monotonic()
    returned_ok(problems, 'virsh domjobabort',
                c.src.timed('domjobabort', c.dom, bound=FORCE_CANCEL_BOUND))
    if expect(problems, writes_complete(
            g, before, len(FROZEN_WRITES),
            FORCE_CANCEL_BOUND - (time.monotonic() - start)),
            f'guest writes did not complete within '
            f'{secs(FORCE_CANCEL_BOUND)} s of the abort (or failed)'):
        print(f'  (guest writes done {time.monotonic() - start:.1f} s after '
              f'the abort)')
    job_ended(g, problems, 'BLOCK_JOB_CANCELLED')
    migration_failed(mig, problems, start, 'canceled by client')
    check(not problems, '; '.join(problems))    # the rest needs the abort
    source_runs_on(c, g, before, problems)
    if dst.virsh('domstate', c.dom, ok=False).returncode == 0:
        returned_ok(problems, 'virsh destroy on the destination',
                    dst.timed('destroy', c.dom, bound=KILL_BOUND))
    check(not problems, '; '.join(problems))


def case_migrate_sync_frozen_destroy(c):
    """migrate --copy-storage-synchronous-writes, the destination frozen
    mid-copy, guest writes waiting for it: virsh destroy of the
    destination's domain while they wait (libvirt's SIGTERM does not stop
    a frozen QEMU: it stays frozen for 10 s, until the SIGKILL); the
    guest's writes complete within a guest write's bound of their start
    (the copy fails), the destroy succeeds, virsh migrate fails within
    the bound, the source runs on, the writes read back, the guest
    writes"""
    dst, mig, g, before, started, problems = frozen_dest_migration(c)
    start = time.monotonic()
    destroyed = []
    destroy = threading.Thread(target=lambda: destroyed.append(
        dst.timed('destroy', c.dom, bound=KILL_BOUND)))
    destroy.start()
    try:
        if expect(problems, writes_complete(
                g, before, len(FROZEN_WRITES),
                GUEST_BOUND - (time.monotonic() - started)),
                f'guest writes did not complete within {secs(GUEST_BOUND)} '
                f's of their start (or failed)'):
            print(f'  (guest writes: {time.monotonic() - started:.1f} s)')
        # Failed, by the stall.  (QEMU's error mostly begins "The target
        # stopped answering (no progress for 5 s)"; once, the destination
        # frozen with the copy's first requests still in flight, v2 said
        # only "Writing to the target failed: Input/output error".)
        job_ended(g, problems, 'BLOCK_JOB_COMPLETED', failed=True)
    finally:
        destroy.join()              # virsh's timeout (bound) ends it
    returned_ok(problems, 'virsh destroy on the destination', destroyed[0])
    migration_failed(mig, problems, start)
    source_runs_on(c, g, before, problems)
    check(not problems, '; '.join(problems))


def case_sync_abort_frozen_target(c):
    """blockcopy --synchronous-writes (write-blocking), READY, the target
    frozen (SIGSTOP) with guest writes in flight: blockjob --abort, and
    other calls on the domain that wait for it, succeed within a guest
    write's bound, the guest's writes complete and read back, no job is
    left, the domain runs and answers, its guest writes"""
    t = c.target()
    c.blockcopy_ready(t, '--synchronous-writes')
    check(sent_write_blocking_mirror(c.src),
          'libvirt did not start the copy in write-blocking mode')
    g = c.guest()
    t.stop()                        # SIGSTOP
    before = g.writes()
    writes = [(0x77, 0), (0x78, 8 * MiB)]
    for pattern, offset in writes:  # to the frozen target as well: wait
        g.aio_write(pattern, offset, '1M')
    problems = []
    # The guest's writes waiting for the target fail the job within a
    # guest write's stall (and NBD's second) of their start, before a
    # cancelled job's own stall timeout: the abort ends then
    abort_copy(c, GUEST_BOUND, problems)
    check(not problems, '; '.join(problems))    # the rest needs the abort
    expect(problems, writes_complete(g, before, len(writes), SLACK),
           'the guest writes did not complete (or failed)')
    domain_usable(c, problems, 0x79, '4M')
    read_back(g, problems, writes)
    check(not problems, '; '.join(problems))


# (name, function, sizes of the domain's disks)
CASES = [('guest-write-checks', case_write_checks, [DISK_SIZE]),
         ('blockcopy-pivot', case_pivot, [DISK_SIZE]),
         ('blockcopy-abort-dead-target', case_abort_dead_target, [DISK_SIZE]),
         ('blockcopy-abort-frozen-target', case_abort_frozen_target,
          [DISK_SIZE]),
         ('migrate-copy-storage', case_migrate, [DISK_SIZE]),
         ('migrate-dest-killed', case_migrate_dest_killed, [DISK_SIZE]),
         ('migrate-writes-outpace-copy', case_migrate_outpaced,
          [16 * MiB, DISK_SIZE]),
         ('migrate-sync-writes', case_migrate_sync, [DISK_SIZE]),
         ('migrate-sync-frozen-abort', case_migrate_sync_frozen_abort,
          [DISK_SIZE]),
         ('migrate-sync-frozen-destroy', case_migrate_sync_frozen_destroy,
          [DISK_SIZE]),
         ('blockcopy-sync-abort-frozen-target', case_sync_abort_frozen_target,
          [DISK_SIZE])]


def run_case(name, fn, sizes):
    """Run one case: None if it passed, else what went wrong (also what it
    left behind)"""
    c = Case(name, sizes)
    error = None
    try:
        c.start()
        fn(c)
    except Exception as e:          # a failure, or something broke
        error = str(e)
        if not isinstance(e, Failure):
            traceback.print_exc()
    finally:
        left = c.close(failed=error is not None)
    if left:
        error = '; '.join(filter(None, [error, 'left behind (killed): ' +
                                        ', '.join(f'{pid} {cmd}'
                                                  for pid, cmd in left)]))
    return error


def main():
    wanted = sys.argv[4:]
    unknown = set(wanted) - {name for name, _, _ in CASES}
    if unknown:
        print(f'no such case: {" ".join(sorted(unknown))}')
        return 2
    passed = failed = 0
    print(f'(a dead orphan lasts up to {secs(ORPHAN_REAP)} s here: in the '
          f'bounds of libvirt killing a QEMU, {secs(KILL_BOUND)} s, and of a '
          f'migration failing, {secs(MIGRATION_FAILED_BOUND)} s)', flush=True)
    try:
        for name, fn, sizes in CASES:
            if wanted and name not in wanted:
                continue
            start = time.monotonic()
            error = run_case(name, fn, sizes)
            if error:
                failed += 1
            else:
                passed += 1
            print(f'{name}: {f"FAIL: {error}" if error else "ok"} '
                  f'({time.monotonic() - start:.1f} s)', flush=True)
    finally:
        kill_leftovers()            # also when interrupted
        for name in os.listdir(WORK):
            if name != 'logs':
                path = os.path.join(WORK, name)
                if os.path.isdir(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    os.unlink(path)
    print(f'{passed} passed, {failed} failed')
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
