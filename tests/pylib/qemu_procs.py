"""Start QEMU and qemu-storage-daemon, talk QMP with timeouts, inject faults.

Shared by bench/bench.py, tests/stress/ and usable from tests/libvirt/suite.py.
The QMP library is the build's in-tree one (build/qemu/python): put its
directory on sys.path before calling anything here that talks QMP.

Every process runs in its own process group (start_new_session), so that a
test can kill a QEMU and whatever it started without touching the test's own
group, and dies with the test (die_with_parent); every QMP call has a
timeout: a QEMU that stops answering is reported (QmpTimeout), never waited
for.
"""

import ctypes
import os
import re
import signal
import subprocess
import time

MiB = 1024 * 1024


class QmpTimeout(Exception):
    """QEMU did not answer a QMP command in time (or is gone)"""


def cpu_seconds(pid):
    """CPU time (user + system) the process has used so far, in seconds"""
    with open(f'/proc/{pid}/stat', encoding='ascii') as f:
        fields = f.read().rsplit(')', 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


def wait_until(cond, timeout, interval=0.05, give_up=None):
    """Poll cond() until it is true: True; False once timeout seconds have
    passed (or give_up() is true) without it"""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline or (give_up and give_up()):
            return False
        time.sleep(interval)
    return True


def wait_for_paths(paths, timeout, proc=None):
    """Wait until every path exists; False if not within timeout (or proc
    exited meanwhile)"""
    return wait_until(lambda: all(os.path.exists(p) for p in paths), timeout,
                      0.01, proc and (lambda: proc.poll() is not None))


_prctl = ctypes.CDLL(None, use_errno=True).prctl
PR_SET_PDEATHSIG = 1


def die_with_parent():
    """preexec_fn for Popen: the child gets SIGKILL when its parent dies, so
    that a test killed with SIGKILL (no atexit, no finally) leaves no QEMU
    or daemon behind.  Linux ties this to the parent *thread*: start with
    it only from a thread that outlives the child (the main thread, or one
    that waits for the child).  With start_new_session=True the child is
    also out of the test's process group, for kill_group()."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


# Every process start_process started and kill_group has not reaped
STARTED = set()


def start_process(args, log_path=None, env=None):
    """Popen in a new session and process group, killed if the test dies
    (die_with_parent); stdout/stderr to log_path (appended) or discarded"""
    out = open(log_path, 'ab') if log_path else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, env=env,
                                start_new_session=True,
                                preexec_fn=die_with_parent)
    finally:
        if log_path:
            out.close()
    STARTED.add(proc)
    return proc


def kill_all_started():
    """For atexit and signal handlers: no process outlives its test"""
    for proc in list(STARTED):
        kill_group(proc)


def kill_process_group(pgid):
    """SIGCONT, then SIGKILL a whole process group (a stopped process, and
    whatever it started, too); never the caller's own"""
    if pgid == os.getpgrp():
        raise ValueError(f'process group {pgid} is our own')
    try:
        os.killpg(pgid, signal.SIGCONT)
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def kill_group(proc):
    """SIGKILL a process started by start_process and its group, reap it"""
    if proc is None:
        return
    kill_process_group(proc.pid)     # its own group: start_new_session
    proc.wait()
    STARTED.discard(proc)


class Qmp:
    """A QMP connection with a timeout on every command, that keeps the
    events it has seen (self.events, in order)"""

    def __init__(self, path, server=False, timeout=5.0):
        from qemu.qmp.legacy import QEMUMonitorProtocol
        self.mon = QEMUMonitorProtocol(path, server=server)
        self.timeout = timeout
        self.events = []
        self.broken = False

    def accept(self, timeout=30.0):
        self.mon.accept(timeout)
        self.mon.settimeout(self.timeout)

    def connect(self):
        self.mon.connect()
        self.mon.settimeout(self.timeout)

    def cmd(self, name, args=None, timeout=None):
        """The reply ({'return': ...} or {'error': ...}); raises QmpTimeout
        if there was none in time or QEMU is gone.  After that the
        connection is unusable (self.broken)."""
        if self.broken:
            raise QmpTimeout(f'{name}: connection already broken')
        if timeout is not None:
            self.mon.settimeout(timeout)
        start = time.monotonic()
        try:
            return self.mon.cmd_raw(name, args or {})
        except Exception as e:     # timeout, EOF, reset: all mean no answer
            self.broken = True
            raise QmpTimeout(f'{name}: no answer after '
                             f'{time.monotonic() - start:.1f} s '
                             f'({type(e).__name__} {e})') from e
        finally:
            if timeout is not None:
                self.mon.settimeout(self.timeout)

    def ok(self, name, args=None, timeout=None):
        """The command's return value; RuntimeError if it failed"""
        r = self.cmd(name, args, timeout)
        if 'error' in r:
            raise RuntimeError(f'{name}: {r["error"]["desc"]}')
        return r['return']

    def pull_events(self, wait=0.0):
        """Move the events QEMU sent into self.events; wait up to `wait`
        seconds for the first one.  Returns the new ones."""
        new = []
        deadline = time.monotonic() + wait
        while not self.broken:
            left = deadline - time.monotonic()
            try:
                ev = self.mon.pull_event(wait=max(left, 0.001)
                                         if not new and left > 0 else False)
            except Exception:      # nothing within the wait
                ev = None
            if not ev:
                break
            new.append(ev)
        self.events += new
        return new

    def wait_event(self, names, timeout, since=0):
        """The first event named in names among self.events[since:] or
        arriving within timeout; None if none"""
        deadline = time.monotonic() + timeout
        i = since
        while True:
            for ev in self.events[i:]:
                if ev['event'] in names:
                    return ev
            i = len(self.events)
            left = deadline - time.monotonic()
            if left <= 0 or self.broken:
                return None
            self.pull_events(min(0.1, left))

    def count(self, name):
        return sum(1 for e in self.events if e['event'] == name)

    def close(self):
        try:
            self.mon.close()
        except Exception:
            pass


def blkdebug_node(name, image, rules):
    """blockdev-add arguments of a blkdebug node over image with these
    inject-error rules (QEMU refuses an empty list)"""
    node = {'driver': 'blkdebug', 'node-name': name, 'image': image}
    if rules:
        node['inject-error'] = rules
    return node


class StorageDaemon:
    """qemu-storage-daemon exporting an image over NBD, as the mirror target.

    The export's chain is  throttle (group 'thr') -> blkdebug -> raw -> file
    (without fault_node: throttle -> raw -> file):
    throttle() limits it, set_faults() swaps in a fresh blkdebug node with
    other inject-error rules (blkdebug ignores new rules on blockdev-reopen,
    so the throttle node's 'file' child is reopened onto a new blkdebug).
    The address is a unix socket path, or ('127.0.0.1', port) for TCP.
    """

    def __init__(self, build, img, addr, mon_path, log_path=None, fmt='raw',
                 fault_node=True):
        self.build, self.img, self.addr, self.fmt = build, img, addr, fmt
        # Without it (benchmarks), throttle -> raw: one layer less per request
        self.fault_node = fault_node
        self.mon_path, self.log_path = mon_path, log_path
        self.proc = None
        self.stopped = False
        self.fault_rules = []
        self._generation = 0
        self.start()

    def nbd_server_addr(self):
        if isinstance(self.addr, str):
            return {'type': 'unix', 'path': self.addr}
        return {'type': 'inet', 'host': self.addr[0], 'port': str(self.addr[1])}

    def nbd_client_addr(self):
        """The 'server' of an nbd blockdev that connects to this export"""
        return self.nbd_server_addr()

    def _args(self):
        addr = self.nbd_server_addr()
        nbd = ','.join(f'addr.{k}={v}' for k, v in addr.items())
        chain = [f'file,node-name=file,filename={self.img}',
                 f'{self.fmt},node-name=raw,file=file']
        below_throttle = 'raw'
        if self.fault_node:
            chain.append('blkdebug,node-name=fault0,image=raw')
            below_throttle = 'fault0'
        chain.append('throttle,node-name=top,throttle-group=thr,'
                     f'file={below_throttle}')
        args = [f'{self.build}/storage-daemon/qemu-storage-daemon',
                '--chardev', f'socket,id=mon,path={self.mon_path},'
                             'server=on,wait=off',
                '--monitor', 'mon',
                '--object', 'throttle-group,id=thr']
        for node in chain:
            args += ['--blockdev', node]
        return args + ['--nbd-server', nbd,
                       '--export', 'nbd,id=e,node-name=top,name=t,'
                                   'writable=on']

    def start(self, timeout=10.0):
        """Start (or restart, on the same address and image) the daemon"""
        for p in (self.mon_path,) + ((self.addr,) if isinstance(self.addr, str)
                                     else ()):
            if os.path.exists(p):
                os.unlink(p)
        self.proc = start_process(self._args(), self.log_path)
        self.stopped = False
        self.fault_rules, self._generation = [], 0
        paths = [self.mon_path] + ([self.addr] if isinstance(self.addr, str)
                                   else [])
        if not wait_for_paths(paths, timeout, self.proc):
            raise RuntimeError('qemu-storage-daemon did not start')
        if not isinstance(self.addr, str):
            self._wait_for_tcp(timeout)

    def _wait_for_tcp(self, timeout):
        import socket
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                socket.create_connection(self.addr, 0.5).close()
                return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError('qemu-storage-daemon: NBD port not listening')

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def kill(self):
        kill_group(self.proc)
        self.stopped = False

    def stop(self):
        """SIGSTOP: the daemon hangs, connections stay open"""
        self.proc.send_signal(signal.SIGSTOP)
        self.stopped = True

    def cont(self):
        self.proc.send_signal(signal.SIGCONT)
        self.stopped = False

    def signal(self, sig):
        self.proc.send_signal(sig)

    def qmp(self, name, args=None, timeout=5.0):
        """One command on a fresh connection; its return value"""
        q = Qmp(self.mon_path, timeout=timeout)
        try:
            q.connect()
            return q.ok(name, args)
        finally:
            q.close()

    def throttle(self, bps):
        """Limit the export's writes to bps bytes/s (0: no limit)"""
        self.qmp('qom-set', {'path': 'thr', 'property': 'limits',
                             'value': {'bps-write': bps}})

    def set_faults(self, rules):
        """Replace the blkdebug node's inject-error rules (a list of
        blkdebug inject-error dicts; [] removes every fault)"""
        old, new = f'fault{self._generation}', f'fault{self._generation + 1}'
        self.qmp('blockdev-add', blkdebug_node(new, 'raw', rules))
        self.qmp('blockdev-reopen', {'options': [{
            'driver': 'throttle', 'node-name': 'top',
            'throttle-group': 'thr', 'file': new}]})
        self._generation += 1
        self.qmp('blockdev-del', {'node-name': old})
        self.fault_rules = list(rules)


class Vm:
    """A QEMU (qtest accelerator: no guest code runs) to which the test
    adds nodes and devices over QMP; the guest's writes come from HMP
    qemu-io on a device.  Its output goes to log_path (for assertions)."""

    def __init__(self, build, work, log_path=None, extra_args=(),
                 timeout=5.0, qmp_path=None):
        self.qmp_path = qmp_path or os.path.join(work, 'qmp.sock')
        self.log_path = log_path
        self.q = Qmp(self.qmp_path, server=True, timeout=timeout)
        self.proc = start_process(
            [f'{build}/qemu-system-x86_64', '-M', 'pc', '-accel', 'qtest',
             '-nodefaults', '-display', 'none',
             '-qmp', f'unix:{self.qmp_path}', *extra_args], log_path)
        self.q.accept(30)

    def alive(self):
        return self.proc.poll() is None

    def cmd(self, name, args=None, timeout=None):
        return self.q.cmd(name, args, timeout)

    def ok(self, name, args=None, timeout=None):
        return self.q.ok(name, args, timeout)

    def qemu_io(self, device, command, timeout=None):
        """Run a qemu-io command as the guest on device (its qdev id);
        returns the HMP reply (see qemu_io_command: a failed request is
        not reported there)"""
        return self.ok('human-monitor-command', {
            'command-line': qemu_io_command(device, command)}, timeout)

    def quit(self, timeout):
        """Seconds until QEMU exited after 'quit', or None (then killed)"""
        start = time.monotonic()
        try:
            self.q.cmd('quit', timeout=timeout)
        except QmpTimeout:
            pass
        try:
            self.proc.wait(max(timeout - (time.monotonic() - start), 0.1))
            return time.monotonic() - start
        except subprocess.TimeoutExpired:
            kill_group(self.proc)
            return None

    def kill(self):
        self.q.close()
        kill_group(self.proc)

    def cpu_seconds(self):
        return cpu_seconds(self.proc.pid)


def qemu_io_command(device, command):
    """The HMP command line that runs a qemu-io command as the guest on
    device (its qdev id).  Its reply holds only errors of the command line
    itself (no such device): qemu-io prints what its requests did, "write
    failed: ..." or "Pattern verification failed ...", on QEMU's stdout
    (line-buffered, so in QEMU's log once the reply came): read that with
    LogTail and qemu_io_failures()."""
    return f'qemu-io -d {device} "{command}"'


# qemu-io's messages for a request that failed ("write failed: EIO",
# "aio_write failed: ...") or read back other data than expected; QEMU's
# own messages in the same log start with its name or a timestamp
QEMU_IO_FAILURE = re.compile(r'^(?:\w+ failed: |Pattern verification failed)'
                             r'.*$', re.M)


def qemu_io_failures(output):
    """qemu-io's failure messages in a piece of QEMU's output"""
    return QEMU_IO_FAILURE.findall(output)


class LogTail:
    """A log file read in pieces: each read() returns the lines added since
    the previous one (the first: all of them)"""

    def __init__(self, path):
        self.path, self.pos = path, 0

    def read(self, partial=False):
        """The new complete lines (and an unfinished last one if partial:
        otherwise it waits for the next read, so that no message is seen
        cut in two)"""
        try:
            with open(self.path, 'rb') as f:
                f.seek(self.pos)
                data = f.read()
        except FileNotFoundError:
            return ''
        if not partial:
            data = data[:data.rfind(b'\n') + 1]
        self.pos += len(data)
        return data.decode(errors='replace')
