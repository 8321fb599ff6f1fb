#!/usr/bin/env python3
"""Debian's libvirt drives the patched QEMU.

    suite.py WORK_DIR BUILD_DIR QEMU_PYTHON_DIR [CASE...]

Run as an unprivileged user (scripts/check-libvirt.sh sees to that).  It
starts its own libvirtd "session" daemons, each with its own XDG
directories and host UUID, and its own qemu-storage-daemon NBD targets,
all by PID, and stops them at the end.  Each case asserts outcomes with
generous time bounds; the last line is "N passed, N failed".

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

MiB = 1024 * 1024
DISK_SIZE = 64 * MiB
BOUND = 60.0              # nothing here should take longer
WORK, BUILD = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])
sys.path.insert(0, sys.argv[3])
QEMU = os.path.join(BUILD, 'qemu-system-x86_64')
QEMU_IMG = os.path.join(BUILD, 'qemu-img')
QSD = os.path.join(BUILD, 'storage-daemon', 'qemu-storage-daemon')


class Failure(Exception):
    pass


def check(cond, what):
    if not cond:
        raise Failure(what)


def wait_for(cond, what, bound=BOUND):
    deadline = time.monotonic() + bound
    while not cond():
        if time.monotonic() > deadline:
            raise Failure(f'{what}: not within {bound:.0f} s')
        time.sleep(0.1)


def run(args, timeout=BOUND, env=None, ok=True):
    """Run a command; its CompletedProcess (text).  ok: it must succeed"""
    try:
        p = subprocess.run(args, capture_output=True, text=True,
                           timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        raise Failure(f'{" ".join(args)}: no answer within {timeout:.0f} s')\
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
        self.sock = os.path.join(self.env['XDG_RUNTIME_DIR'], 'libvirt',
                                 'libvirt-sock')
        self.uri = f'qemu:///session?socket={self.sock}'
        self.proc = subprocess.Popen(['libvirtd'], env=self.env,
                                     stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: self.virsh('list', ok=False).returncode == 0,
                     f'libvirtd in {self.dir} answering')
        except Failure:
            self.proc.kill()
            self.proc.wait()
            raise

    def virsh(self, *args, timeout=BOUND, ok=True):
        return run(['virsh', '-q', '-c', self.uri] + list(args),
                   timeout=timeout, env=self.env, ok=ok)

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

    def qemu_logs(self):
        """libvirt's log of each QEMU it ran"""
        logs = os.path.join(self.env['XDG_CACHE_HOME'], 'libvirt', 'qemu',
                            'log')
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
        for dom in self.virsh('list', '--name', ok=False).stdout.split():
            self.virsh('destroy', dom, ok=False)
        self.proc.terminate()
        try:
            self.proc.wait(BOUND)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


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


class NbdTarget:
    """qemu-storage-daemon exporting a raw image as NBD export 'disk'"""

    def __init__(self, name):
        self.img = os.path.join(WORK, f'{name}.img')
        self.sock = os.path.join(WORK, f'{name}.sock')
        make_image(self.img)
        self.proc = subprocess.Popen(
            [QSD, '--blockdev', f'file,node-name=f,filename={self.img}',
             '--blockdev', 'raw,node-name=disk,file=f',
             '--nbd-server', f'addr.type=unix,addr.path={self.sock}',
             '--export', 'nbd,id=e,node-name=disk,name=disk,writable=on'],
            stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: os.path.exists(self.sock), 'NBD socket')
        except Failure:
            self.stop()
            raise

    def xml(self):
        path = os.path.join(WORK, 'nbd-target.xml')
        with open(path, 'w') as f:
            f.write(f"""<disk type='network' device='disk'>
  <driver name='qemu' type='raw'/>
  <source protocol='nbd' name='disk'>
    <host transport='unix' socket='{escape(self.sock)}'/>
  </source>
</disk>
""")
        return path

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
        self.proc.wait()


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


class Guest:
    """Writes as the guest would, through the virtio-blk device's
    BlockBackend, on our own QMP monitor"""

    def __init__(self, qmp_path):
        from qemu.qmp.legacy import QEMUMonitorProtocol
        self.qmp = QEMUMonitorProtocol(qmp_path)
        self.qmp.connect()
        self.qmp.settimeout(BOUND)

    def write(self, pattern, offset, length):
        out = self.qmp.cmd('human-monitor-command', **{'command-line': (
            f'qemu-io -d virtio-disk0/virtio-backend '
            f'"write -q -P {pattern} {offset} {length}"')})
        check(out == '', f'guest write failed: {out}')

    def aio_write(self, pattern, offset, length):
        """Start a write and return at once, as a guest's request is in
        flight while the guest runs on (a synchronous qemu-io write would
        hold QEMU's main loop, and libvirt's monitor with it, until the
        write completes)"""
        out = self.qmp.cmd('human-monitor-command', **{'command-line': (
            f'qemu-io -d virtio-disk0/virtio-backend '
            f'"aio_write -q -P {pattern} {offset} {length}"')})
        check(out == '', f'guest write not started: {out}')

    def writes(self):
        """(completed, failed) writes of the guest's disk vda so far"""
        for dev in self.qmp.cmd('query-blockstats'):
            if 'virtio-disk0' in dev.get('qdev', '') + dev.get('device', ''):
                st = dev['stats']
                return st['wr_operations'], st['failed_wr_operations']
        raise Failure('no blockstats for virtio-disk0')

    def jobs(self):
        return self.qmp.cmd('query-block-jobs')

    def dirty(self, img):
        """Bytes a copy job has yet to copy from an image: the dirty bitmap
        of the job's filter node above it (the job's own len - offset is
        not updated while the job waits for the target)"""
        for n in self.qmp.cmd('query-named-block-nodes'):
            if n['drv'] == 'mirror_top' and n['file'] == img:
                return sum(m['count'] for m in n.get('dirty-bitmaps', []))
        return 0

    def close(self):
        try:
            self.qmp.close()
        except Exception:       # QEMU is gone (migrated away, killed)
            pass


def hmp_write(daemon, dom, pattern, offset, length):
    """A guest-like write through libvirt's own monitor"""
    out = daemon.virsh('qemu-monitor-command', dom, '--hmp',
                       f'qemu-io -d virtio-disk0/virtio-backend '
                       f'"write -q -P {pattern} {offset} {length}"').stdout
    check(out.strip() == '', f'write through libvirt failed: {out}')


class Case:
    """One test case: a daemon, a running domain on a patterned image,
    and whatever the case adds, all stopped at the end"""

    def __init__(self, name, sizes):
        self.name = name
        self.sizes = sizes
        self.dom = 'lv'
        self.cleanups = []
        self.daemons = []

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
        t = NbdTarget(f'{self.name}-{name}')
        self.cleanups.append(t.stop)
        return t

    def guest(self, qmp=None):
        g = Guest(qmp or self.qmp)
        self.cleanups.append(g.close)
        return g

    def job(self):
        """'virsh blockjob --info' of vda ('Block Copy: [100 %]' from
        libvirt 9.0, '[100.00 %]' from 11.x, on stderr), '' when there is
        no job"""
        p = self.src.virsh('blockjob', self.dom, 'vda', '--info')
        out = (p.stdout + p.stderr).strip()
        return out if 'Block' in out else ''

    def blockcopy_ready(self, target, *extra):
        self.src.virsh('blockcopy', self.dom, 'vda', '--xml', target.xml(),
                       '--reuse-external', '--transient-job', '--wait',
                       *extra, timeout=BOUND)
        check(self.ready(), f'copy not ready: {self.job()}')

    def ready(self):
        """virsh blockjob --info says the copy of vda is ready"""
        return re.search(r'\[100(\.0+)? %\]', self.job()) is not None

    def close(self, failed):
        if failed:
            for d in self.daemons:
                d.show_logs()
        for fn in reversed(self.cleanups):
            try:
                fn()
            except Exception:       # keep cleaning up
                traceback.print_exc()
        self.save_logs()

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


# The cases

def case_pivot(c):
    """blockcopy to NBD, READY, pivot: the guest runs on the target"""
    t = c.target()
    hmp_write(c.src, c.dom, 0x22, 0, '1M')
    c.blockcopy_ready(t)
    hmp_write(c.src, c.dom, 0x33, '8M', '1M')      # mirrored while READY
    c.src.virsh('blockjob', c.dom, 'vda', '--pivot')
    check(c.job() == '', 'a job is left after the pivot')
    blk = c.src.virsh('domblklist', c.dom).stdout
    check('disk' in blk and c.img not in blk,
          f'the guest does not run on the target: {blk}')
    check(identical(c.img, t.img), 'source and target differ')
    hmp_write(c.src, c.dom, 0x44, '16M', '1M')     # now into the target
    run([os.path.join(BUILD, 'qemu-io'), '-f', 'raw', '-r', '-U', '-c',
         'read -q -P 0x44 16M 1M', t.img])


def case_abort_dead_target(c):
    """blockcopy, target killed after READY, the guest writes, --abort:
    returns, the job is gone, guest writes still succeed.  The write can
    make the job fail by itself (on-target-error=report) before the abort
    comes: then libvirt answers that there is no job to abort, or (11.3,
    before it has seen the job end) passes on QEMU's refusal to cancel a
    concluded job."""
    t = c.target()
    c.blockcopy_ready(t)
    t.proc.kill()
    t.proc.wait()
    hmp_write(c.src, c.dom, 0x55, 0, '1M')
    p = c.src.virsh('blockjob', c.dom, 'vda', '--abort', timeout=BOUND,
                    ok=False)
    ended_by_itself = ('does not have an active block job' in p.stderr or
                       "in state 'concluded' cannot accept command verb "
                       "'cancel'" in p.stderr)
    check(p.returncode == 0 or ended_by_itself,
          f'virsh blockjob --abort: {p.stderr.strip()}')
    wait_for(lambda: c.job() == '', 'the job is gone', bound=10)
    hmp_write(c.src, c.dom, 0x66, '1M', '1M')
    check(c.img in c.src.virsh('domblklist', c.dom).stdout,
          'the guest is not on its own disk any more')


def case_abort_frozen_target(c):
    """blockcopy, target frozen (SIGSTOP) with writes in flight, --abort:
    returns within the bound, and other calls on the domain keep
    working meanwhile and after (stock QEMU hangs here, and libvirt with
    it: 'cannot acquire state change lock')"""
    t = c.target()
    c.blockcopy_ready(t)
    t.proc.send_signal(signal.SIGSTOP)
    g = c.guest()
    g.write(0x77, 0, '4M')          # copied to the frozen target: hangs
    start = time.monotonic()
    abort = threading.Thread(target=lambda: c.src.virsh(
        'blockjob', c.dom, 'vda', '--abort', timeout=BOUND, ok=False))
    abort.start()
    time.sleep(1)
    # Another call that needs the domain's job lock, while the abort runs
    c.src.virsh('qemu-monitor-command', c.dom, '--hmp', 'info status',
                timeout=BOUND)
    abort.join(BOUND)
    check(not abort.is_alive(), 'virsh blockjob --abort did not return')
    took = time.monotonic() - start
    check(c.job() == '', 'the job is still there')
    hmp_write(c.src, c.dom, 0x78, '4M', '1M')
    check(c.src.virsh('domstate', c.dom).stdout.strip() == 'running',
          'the domain is not running')
    print(f'  (abort returned after {took:.1f} s)')


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
    hmp_write(c.src, c.dom, 0x22, 0, '2M')
    dst_imgs, args = migrate_args(c, dst, os.path.join(WORK, 'mig-dst.qmp'),
                                  *extra)
    c.src.virsh(*args, timeout=BOUND * 2)
    check(dst.virsh('domstate', c.dom).stdout.strip() == 'running',
          'the domain does not run on the destination')
    check(c.src.virsh('domstate', c.dom, ok=False).returncode != 0,
          'the domain is still on the source')
    check(all(map(identical, c.imgs, dst_imgs)),
          'source and destination disks differ')


def case_migrate_dest_killed(c):
    """The destination QEMU is killed during the storage copy: migrate
    fails cleanly, the source keeps running and writable"""
    dst = c.daemon()
    _, args = migrate_args(c, dst, os.path.join(WORK, 'kill-dst.qmp'))
    # 2 MiB/s: the copy of 64 MiB takes long enough to kill during it
    mig = subprocess.Popen(['virsh', '-q', '-c', c.src.uri] + args +
                           ['--bandwidth', '2'], env=c.src.env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    wait_for(lambda: dst.virsh('domstate', c.dom, ok=False).returncode == 0,
             'the destination domain')
    time.sleep(2)
    os.kill(dst.qemu_pid(c.dom), signal.SIGKILL)
    try:
        _, err = mig.communicate(timeout=BOUND)
    except subprocess.TimeoutExpired as e:
        mig.kill()
        raise Failure('virsh migrate did not return') from e
    check(mig.returncode != 0, 'migrate succeeded with a dead destination')
    check(c.src.virsh('domstate', c.dom).stdout.strip() == 'running',
          'the source domain is not running')
    check(c.job() == '', 'a block job is left on the source')
    hmp_write(c.src, c.dom, 0x99, 0, '1M')
    print(f'  (migrate failed with: {err.strip().splitlines()[-1]})')


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

    def look():
        for j in g.jobs():
            if j['device'].endswith('virtio-disk0'):
                seen.append((j['status'], g.dirty(c.imgs[0])))
        return seen[-1][0] if seen else None

    def writer():
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
                    g.qmp.cmd('query-status')['running']:
                g.write(0x20 + i % 64, (i % 16) * MiB, '1M')
                written.append(i)
                look()
                i += 1
                time.sleep(0.05)
        finally:
            os.kill(dest_qemu, signal.SIGCONT)
        while not stop.is_set():
            try:
                look()
            except Exception:   # the source QEMU ended: migrated
                return
            time.sleep(0.2)

    w = threading.Thread(target=writer)
    w.start()
    try:
        c.src.virsh(*args, '--bandwidth', '4', timeout=BOUND * 2)
    finally:
        stop.set()
        w.join()
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


# A guest's writes to a disk whose copy target stopped answering: within
# this many seconds they complete (a Linux guest's SCSI disks time out
# after 30 s)
GUEST_BOUND = 30.0


def expect(problems, cond, what):
    """check(), but noted in problems and the case goes on, so that one
    run tells all that went wrong"""
    if not cond:
        problems.append(what)
        print(f'  ({what})', flush=True)
    return cond


def writes_complete(g, before, n, bound=GUEST_BOUND):
    """Whether n guest writes started after blockstats `before` (and all
    others) completed within bound, none of them failed"""
    try:
        wait_for(lambda: g.writes()[0] >= before[0] + n, 'guest writes',
                 bound)
    except Failure:
        return False
    return g.writes()[1] == before[1]


def stop_process(proc):
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


def frozen_dest_migration(c):
    """migrate --copy-storage-all --copy-storage-synchronous-writes at
    2 MiB/s, the destination QEMU frozen (SIGSTOP) once the copy of vda
    is under way, guest writes started: (destination daemon, virsh
    migrate's process, guest, blockstats before the writes, problems)"""
    dst = c.daemon()
    _, args = migrate_args(c, dst, os.path.join(WORK, f'{c.name}-dst.qmp'),
                           '--copy-storage-synchronous-writes',
                           '--bandwidth', '2')
    mig = subprocess.Popen(['virsh', '-q', '-c', c.src.uri] + args,
                           env=c.src.env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    c.cleanups.append(lambda: stop_process(mig))
    g = c.guest()
    wait_for(lambda: any(j['offset'] > 0 for j in g.jobs()),
             'the storage copy under way')
    dest_qemu = dst.qemu_pid(c.dom)
    os.kill(dest_qemu, signal.SIGSTOP)
    c.cleanups.append(lambda: os.kill(dest_qemu, signal.SIGCONT)
                      if os.path.exists(f'/proc/{dest_qemu}') else None)
    problems = []
    before = g.writes()
    for i in range(4):          # 4 MiB, some of it where the copy is
        g.aio_write(0x40 + i, f'{i * 8}M', '1M')
    start = time.monotonic()
    expect(problems, writes_complete(g, before, 4),
           f'guest writes did not complete within {GUEST_BOUND:.0f} s of '
           f'the destination freezing')
    print(f'  (guest writes: {time.monotonic() - start:.1f} s)')
    return dst, mig, g, before, problems


def migration_failed(c, mig, problems, start):
    """virsh migrate ended within the bound, with an error"""
    try:
        _, err = mig.communicate(timeout=BOUND)
    except subprocess.TimeoutExpired:
        expect(problems, False, f'virsh migrate did not return within '
               f'{BOUND:.0f} s')
        return
    expect(problems, mig.returncode != 0, 'virsh migrate succeeded')
    last = (err.strip().splitlines() or [''])[-1]
    print(f'  (migrate failed after {time.monotonic() - start:.1f} s: '
          f'{last})')


def source_runs_on(c, g, before, problems):
    """The source domain runs, without a block job, and its guest writes"""
    expect(problems, writes_complete(g, before, 4, 5),
           'the guest writes started while the destination was frozen '
           'did not complete (or failed) after the migration failed')
    p = c.src.virsh('domstate', c.dom, ok=False)
    expect(problems, p.stdout.strip() == 'running',
           f'source domain not running: {(p.stdout + p.stderr).strip()}')
    expect(problems, c.job() == '', 'a block job is left on the source')
    now = g.writes()
    g.aio_write(0x60, '1M', '1M')
    expect(problems, writes_complete(g, now, 1, 10),
           'a new guest write did not complete within 10 s')


def case_migrate_sync_frozen_abort(c):
    """migrate --copy-storage-synchronous-writes, the destination frozen
    mid-copy: the guest's writes complete; virsh domjobabort returns,
    virsh migrate fails within the bound, the source runs on and its guest
    writes, the destination's domain is gone or destroyable"""
    dst, mig, g, before, problems = frozen_dest_migration(c)
    start = time.monotonic()
    p = c.src.virsh('domjobabort', c.dom, ok=False)
    expect(problems, p.returncode == 0,
           f'virsh domjobabort: {p.stderr.strip()}')
    print(f'  (domjobabort returned after {time.monotonic() - start:.1f} s)')
    migration_failed(c, mig, problems, start)
    source_runs_on(c, g, before, problems)
    if dst.virsh('domstate', c.dom, ok=False).returncode == 0:
        p = dst.virsh('destroy', c.dom, ok=False)
        expect(problems, p.returncode == 0,
               f'virsh destroy on the destination: {p.stderr.strip()}')
    check(not problems, '; '.join(problems))


def case_migrate_sync_frozen_destroy(c):
    """migrate --copy-storage-synchronous-writes, the destination frozen
    mid-copy: the guest's writes complete; virsh destroy of the
    destination's domain works, virsh migrate fails within the bound, the
    source runs on and its guest writes"""
    dst, mig, g, before, problems = frozen_dest_migration(c)
    start = time.monotonic()
    p = dst.virsh('destroy', c.dom, ok=False)
    expect(problems, p.returncode == 0,
           f'virsh destroy on the destination: {p.stderr.strip()}')
    print(f'  (destroy returned after {time.monotonic() - start:.1f} s)')
    migration_failed(c, mig, problems, start)
    source_runs_on(c, g, before, problems)
    check(not problems, '; '.join(problems))


def case_sync_abort_frozen_target(c):
    """blockcopy --synchronous-writes (write-blocking), READY, the target
    frozen (SIGSTOP) with guest writes in flight: blockjob --abort
    returns within the bound, other calls on the domain keep working
    meanwhile, and the guest's writes complete"""
    t = c.target()
    c.blockcopy_ready(t, '--synchronous-writes')
    check(sent_write_blocking_mirror(c.src),
          'libvirt did not start the copy in write-blocking mode')
    g = c.guest()
    t.proc.send_signal(signal.SIGSTOP)
    before = g.writes()
    g.aio_write(0x77, 0, '1M')      # to the frozen target as well: waits
    g.aio_write(0x78, '8M', '1M')
    problems = []
    start = time.monotonic()
    aborted = []                # virsh blockjob --abort's error, if any

    def abort():
        try:
            p = c.src.virsh('blockjob', c.dom, 'vda', '--abort', ok=False)
            aborted.append(p.stderr.strip() if p.returncode else '')
        except Failure as e:
            aborted.append(str(e))

    t_abort = threading.Thread(target=abort)
    t_abort.start()
    time.sleep(1)
    # Other calls that need the domain's job lock, while the abort runs
    for call in (('qemu-monitor-command', c.dom, '--hmp', 'info status'),
                 ('domblkinfo', c.dom, 'vda')):
        p = c.src.virsh(*call, ok=False)
        expect(problems, p.returncode == 0,
               f'virsh {call[0]} during the abort: {p.stderr.strip()}')
    t_abort.join(BOUND + 5)         # virsh's own bound ends it first
    print(f'  (abort ended after {time.monotonic() - start:.1f} s)')
    if not aborted or aborted[0]:
        problems.append('virsh blockjob --abort: ' +
                        (aborted[0] if aborted else 'no answer'))
    check(not problems, '; '.join(problems))    # the rest needs the abort
    expect(problems, c.job() == '', 'the job is still there')
    expect(problems, writes_complete(g, before, 2, 5),
           'the guest writes did not complete (or failed)')
    now = g.writes()
    g.aio_write(0x79, '4M', '1M')
    expect(problems, writes_complete(g, now, 1, 10),
           'a new guest write did not complete within 10 s')
    p = c.src.virsh('domstate', c.dom, ok=False)
    expect(problems, p.stdout.strip() == 'running',
           f'the domain is not running: {(p.stdout + p.stderr).strip()}')
    check(not problems, '; '.join(problems))


# (name, function, sizes of the domain's disks)
CASES = [('blockcopy-pivot', case_pivot, [DISK_SIZE]),
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


def main():
    wanted = sys.argv[4:]
    passed = failed = 0
    for name, fn, sizes in CASES:
        if wanted and name not in wanted:
            continue
        start = time.monotonic()
        c = Case(name, sizes)
        result = 'FAIL'
        try:
            c.start()
            fn(c)
            result = 'ok'
            passed += 1
        except Exception as e:      # a failure, or something broke
            result = f'FAIL: {e}'
            if not isinstance(e, Failure):
                traceback.print_exc()
            failed += 1
        finally:
            c.close(failed=result != 'ok')
        print(f'{name}: {result} ({time.monotonic() - start:.1f} s)',
              flush=True)
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
