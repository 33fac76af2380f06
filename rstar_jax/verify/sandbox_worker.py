"""Sandbox worker: a fork server with the step libraries already imported that runs each program in a fresh,
locked-down child process.

Started by ``rstar_jax.verify.sandbox.Sandbox`` as ``python -s -B -P <this file>`` with a scrubbed environment.
Standard library only, so it never imports the rest of the package (or JAX).

Processes of one worker:
  launcher     host namespaces. Unshares new mount, network, IPC, UTS and PID namespaces (inside a new user
               namespace when not root), forks the fork server and waits for it.
  fork server  pid 1 of the new PID namespace: its own /proc, a read-only view of the file system, no network
               interfaces. Imports numpy/sympy once, then per request mounts a fresh tmpfs on /tmp and forks:
  child        own session; resource limits; no new privileges; Landlock (writes only under /tmp, no TCP, no
               signals to processes outside its own); unprivileged uid when started as root; no capabilities;
               a seccomp filter (no sockets, no namespace, mount, ptrace or kernel-module calls); /dev/null as
               stdin/stdout/stderr. It runs the program with a bounded capture of sys.stdout, reports over a
               pipe and exits. The fork server then kills everything left in its namespace and drops the tmpfs.
Every layer degrades on its own where the platform refuses it; the ``ready`` message lists what is in force.

Protocol on the launcher's stdin/stdout: frames of a 4-byte big-endian length and UTF-8 JSON. The host sends the
configuration and gets ``{"ready": isolation}`` or ``{"fatal": message}``; then each ``{"id", "source",
"timeout_s"}`` request gets one reply. The child reports to the fork server in the same framing over a pipe that
the program can also write to: that report is untrusted, size-bounded and validated.
"""
from __future__ import annotations

import builtins
import ctypes
import errno
import gc
import importlib
import io
import json
import math
import os
import platform
import resource
import select
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback

# ------------------------------------------------------------------------------------------------ framing
MAX_REQUEST_BYTES = 64 << 20


def read_frame(fd: int, limit: int = MAX_REQUEST_BYTES) -> bytes | None:
    """One frame from a blocking fd; None at a clean end of file."""
    header = _read_exactly(fd, 4)
    if header is None:
        return None
    size = int.from_bytes(header, "big")
    if size > limit:
        raise ValueError(f"frame of {size} bytes exceeds the {limit}-byte limit")
    body = _read_exactly(fd, size)
    if body is None:
        raise EOFError("stream ended inside a frame")
    return body


def _read_exactly(fd: int, size: int) -> bytes | None:
    chunks, got = [], 0
    while got < size:
        chunk = os.read(fd, min(size - got, 1 << 20))
        if not chunk:
            if got == 0:
                return None
            raise EOFError("stream ended inside a frame")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def write_frame(fd: int, message: dict) -> None:
    payload = json.dumps(message, ensure_ascii=True).encode("ascii")
    data = memoryview(len(payload).to_bytes(4, "big") + payload)
    while data:
        data = data[os.write(fd, data):]


# ---------------------------------------------------------------------------------------- Linux calls
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET, CLONE_NEWCGROUP = 0x10000000, 0x20000000, 0x40000000, 0x02000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 0x2, 0x4, 0x8, 0x20, 0x1000, 0x4000, 0x40000
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_SECCOMP, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 22, 36, 38
SECCOMP_MODE_FILTER = 2
_SYS_MOUNT_SETATTR = 442  # the same number on x86_64 and in the asm-generic table (aarch64)
_AT_FDCWD, _AT_RECURSIVE, _MOUNT_ATTR_RDONLY = -100, 0x8000, 0x1


def _checked(result: int, what: str) -> int:
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def unshare(flags: int) -> None:
    _checked(_libc.unshare(ctypes.c_int(flags)), "unshare")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    def encode(text):
        return None if text is None else text.encode()
    _checked(_libc.mount(encode(source), encode(target), encode(fstype), flags, encode(data)), f"mount {target}")


def umount_detached(target: str) -> None:
    _checked(_libc.umount2(target.encode(), ctypes.c_int(MNT_DETACH)), f"umount {target}")


def make_mounts_readonly(path: str = "/") -> None:
    """Every mount at and below ``path`` read-only, in this mount namespace only (mount_setattr(2))."""
    attr = struct.pack("QQQQ", _MOUNT_ATTR_RDONLY, 0, 0, 0)
    _checked(_libc.syscall(ctypes.c_long(_SYS_MOUNT_SETATTR), ctypes.c_int(_AT_FDCWD), path.encode(),
                           ctypes.c_uint(_AT_RECURSIVE), ctypes.c_char_p(attr), ctypes.c_size_t(len(attr))),
             "mount_setattr")


def prctl(option: int, value: int = 0) -> None:
    _checked(_libc.prctl(ctypes.c_int(option), ctypes.c_ulong(value), ctypes.c_ulong(0), ctypes.c_ulong(0),
                         ctypes.c_ulong(0)), f"prctl({option})")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


# ------------------------------------------------------------------------------------------------ seccomp
# Syscalls a math program never needs that reach the network, other processes' memory or the kernel's
# namespace, mount, key and module machinery (plus clone with namespace flags, kill(-1) and terminal input
# injection, checked by argument). Numbers checked against both kernel syscall tables.
_DENIED_SYSCALLS = {
    "x86_64": dict(socket=41, socketpair=53, ptrace=101, process_vm_readv=310, process_vm_writev=311,
                   io_uring_setup=425, io_uring_enter=426, io_uring_register=427, bpf=321, perf_event_open=298,
                   userfaultfd=323, unshare=272, setns=308, mount=165, umount2=166, pivot_root=155, chroot=161,
                   keyctl=250, add_key=248, request_key=249, kexec_load=246, kexec_file_load=320, init_module=175,
                   finit_module=313, delete_module=176, reboot=169, swapon=167, swapoff=168, acct=163,
                   name_to_handle_at=303, open_by_handle_at=304, open_tree=428, move_mount=429, fsopen=430,
                   fsconfig=431, fsmount=432, fspick=433, mount_setattr=442),
    "aarch64": dict(socket=198, socketpair=199, ptrace=117, process_vm_readv=270, process_vm_writev=271,
                    io_uring_setup=425, io_uring_enter=426, io_uring_register=427, bpf=280, perf_event_open=241,
                    userfaultfd=282, unshare=97, setns=268, mount=40, umount2=39, pivot_root=41, chroot=51,
                    keyctl=219, add_key=217, request_key=218, kexec_load=104, kexec_file_load=294,
                    init_module=105, finit_module=273, delete_module=106, reboot=142, swapon=224, swapoff=225,
                    acct=89, name_to_handle_at=264, open_by_handle_at=265, open_tree=428, move_mount=429,
                    fsopen=430, fsconfig=431, fsmount=432, fspick=433, mount_setattr=442),
}
_ARCH = {"x86_64": (0xC000003E, dict(clone=56, clone3=435, kill=62, ioctl=16)),
         "aarch64": (0xC00000B7, dict(clone=220, clone3=435, kill=129, ioctl=29))}
_TIOCSTI, _TIOCLINUX = 0x5412, 0x541C  # push input into a terminal: a classic way out through the user's shell
_NAMESPACE_CLONE_FLAGS = (CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID
                          | CLONE_NEWNET | CLONE_NEWCGROUP)
_RET_KILL_PROCESS, _RET_ERRNO, _RET_ALLOW = 0x80000000, 0x00050000, 0x7FFF0000
_LD_W_ABS, _JEQ_K, _JGE_K, _JSET_K, _RET_K = 0x20, 0x15, 0x35, 0x45, 0x06


def seccomp_program(machine: str) -> list[tuple[int, int, int, int]] | None:
    """Classic-BPF filter (code, jt, jf, k) for ``machine``; None where we have no syscall table."""
    if machine not in _DENIED_SYSCALLS:
        return None
    audit_arch, special = _ARCH[machine]
    code: list[tuple] = []  # (opcode, jump-if-true label, jump-if-false label, k)

    def emit(op, k, jt=None, jf=None):
        code.append((op, jt, jf, k))

    emit(_LD_W_ABS, 4)                                    # seccomp_data.arch
    emit(_JEQ_K, audit_arch, None, "kill")                # a foreign ABI (i386 int 0x80) dies
    emit(_LD_W_ABS, 0)                                    # seccomp_data.nr
    if machine == "x86_64":
        emit(_JGE_K, 0x40000000, "deny", None)            # the x32 ABI
    emit(_JEQ_K, special["clone3"], "enosys", None)       # its flags live in memory: make libc fall back to clone
    emit(_JEQ_K, special["clone"], "check_clone", None)
    emit(_JEQ_K, special["kill"], "check_kill", None)
    emit(_JEQ_K, special["ioctl"], "check_ioctl", None)
    for number in sorted(_DENIED_SYSCALLS[machine].values()):
        emit(_JEQ_K, number, "deny", None)
    emit(_RET_K, _RET_ALLOW)
    labels = {"check_clone": len(code)}
    emit(_LD_W_ABS, 16)                                   # clone flags (low word of args[0])
    emit(_JSET_K, _NAMESPACE_CLONE_FLAGS, "deny", "allow")
    labels["check_kill"] = len(code)
    emit(_LD_W_ABS, 16)                                   # kill's pid (low word)
    emit(_JEQ_K, 0xFFFFFFFF, "deny", "allow")             # kill(-1, ...): every process it may signal
    labels["check_ioctl"] = len(code)
    emit(_LD_W_ABS, 24)                                   # ioctl request (low word of args[1])
    emit(_JEQ_K, _TIOCSTI, "deny", None)
    emit(_JEQ_K, _TIOCLINUX, "deny", "allow")
    labels["allow"] = len(code)
    emit(_RET_K, _RET_ALLOW)
    labels["deny"] = len(code)
    emit(_RET_K, _RET_ERRNO | errno.EPERM)
    labels["enosys"] = len(code)
    emit(_RET_K, _RET_ERRNO | errno.ENOSYS)
    labels["kill"] = len(code)
    emit(_RET_K, _RET_KILL_PROCESS)

    def offset(label, at):
        return 0 if label is None else labels[label] - at - 1

    return [(op, offset(jt, i), offset(jf, i), k) for i, (op, jt, jf, k) in enumerate(code)]


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


# ----------------------------------------------------------------------------------------------- landlock
# Landlock (Linux 5.13+, unprivileged): file writes only beneath the working directory; with ABI 4+ no TCP
# bind/connect; with ABI 6+ no signals to processes outside the program's own. Holds without root or namespaces.
_SYS_LANDLOCK_CREATE_RULESET, _SYS_LANDLOCK_ADD_RULE, _SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
_LANDLOCK_RULE_PATH_BENEATH = 1
_FS_WRITE_FILE = 1 << 1
_FS_WRITES_V1 = sum(1 << bit for bit in (1, 4, 5, 6, 7, 8, 9, 10, 11, 12))  # write, remove, make-anything
_FS_REFER, _FS_TRUNCATE = 1 << 13, 1 << 14                                     # ABI 2, ABI 3
_NET_BIND_TCP, _NET_CONNECT_TCP = 1 << 0, 1 << 1                               # ABI 4
_SCOPE_ABSTRACT_UNIX_SOCKET, _SCOPE_SIGNAL = 1 << 0, 1 << 1                    # ABI 6


def landlock_abi() -> int:
    version = _libc.syscall(ctypes.c_long(_SYS_LANDLOCK_CREATE_RULESET), None, ctypes.c_size_t(0),
                            ctypes.c_uint32(1))  # LANDLOCK_CREATE_RULESET_VERSION
    return max(0, version)


def landlock_ruleset(write_root: str, abi: int) -> int:
    """A ruleset fd allowing writes only beneath ``write_root`` and to /dev/null; TCP and outside signals
    denied where the ABI has them. A rule on a mount point is hidden by what is later mounted over it, so
    ``write_root`` must be the directory as the program will see it."""
    writes = _FS_WRITES_V1 | (_FS_REFER if abi >= 2 else 0) | (_FS_TRUNCATE if abi >= 3 else 0)
    fields = [writes]
    if abi >= 4:
        fields.append(_NET_BIND_TCP | _NET_CONNECT_TCP)  # handled with no rule: every bind/connect denied
    if abi >= 6:
        fields.append(_SCOPE_ABSTRACT_UNIX_SOCKET | _SCOPE_SIGNAL)
    attr = struct.pack(f"{len(fields)}Q", *fields)
    ruleset = _checked(_libc.syscall(ctypes.c_long(_SYS_LANDLOCK_CREATE_RULESET), ctypes.c_char_p(attr),
                                     ctypes.c_size_t(len(attr)), ctypes.c_uint32(0)), "landlock_create_ruleset")
    device_writes = _FS_WRITE_FILE | (_FS_TRUNCATE if abi >= 3 else 0)
    try:
        for path, allowed in ((write_root, writes), (os.devnull, device_writes)):
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                rule = struct.pack("=Qi", allowed, fd)  # struct landlock_path_beneath_attr is packed
                _checked(_libc.syscall(ctypes.c_long(_SYS_LANDLOCK_ADD_RULE), ctypes.c_int(ruleset),
                                       ctypes.c_int(_LANDLOCK_RULE_PATH_BENEATH), ctypes.c_char_p(rule),
                                       ctypes.c_uint32(0)), f"landlock_add_rule {path}")
            finally:
                os.close(fd)
    except OSError:
        os.close(ruleset)
        raise
    return ruleset


# --------------------------------------------------------------------------------------------- namespaces
def enter_namespaces(wanted: bool) -> dict:
    """Unshare what the platform allows, one namespace at a time. With a new PID namespace this forks: the
    caller continues as its pid 1 while this (launcher) process waits for it. Returns what is in force."""
    info = dict(user_namespace=False, mount_namespace=False, network_namespace=False, ipc_namespace=False,
                uts_namespace=False, pid_namespace=False)
    if not wanted:
        return info
    privileged = os.geteuid() == 0
    if not privileged:
        info["user_namespace"] = _enter_user_namespace()
    if privileged or info["user_namespace"]:
        for key, flag in (("mount_namespace", CLONE_NEWNS), ("network_namespace", CLONE_NEWNET),
                          ("ipc_namespace", CLONE_NEWIPC), ("uts_namespace", CLONE_NEWUTS),
                          ("pid_namespace", CLONE_NEWPID)):
            try:
                unshare(flag)
                info[key] = True
            except OSError:
                pass
    if info["pid_namespace"]:
        _become_pid_namespace_init()
    return info


def _enter_user_namespace() -> bool:
    """A user namespace mapping just our own uid/gid: capabilities over the namespaces created next."""
    uid, gid = os.getuid(), os.getgid()
    try:
        unshare(CLONE_NEWUSER)
    except OSError:
        return False
    for path, text in (("/proc/self/setgroups", "deny"), ("/proc/self/uid_map", f"{uid} {uid} 1"),
                       ("/proc/self/gid_map", f"{gid} {gid} 1")):
        with open(path, "w") as f:
            f.write(text)
    return True


def _become_pid_namespace_init() -> None:
    child = os.fork()
    if child == 0:  # the fork server: dies with the launcher, and its death ends the whole namespace
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        return
    os.close(0)  # keep no copy of the pipes: the host must see end of file when the fork server exits
    os.close(1)
    status = _wait_status(child)
    os._exit(os.waitstatus_to_exitcode(status) & 0xFF if os.WIFEXITED(status) else 1)


# ---------------------------------------------------------------------------------------------- the child
REPORT_FD = 3
EXIT_LOCKDOWN_FAILED = 71

# Bound before any untrusted code runs: replacing builtins, module attributes or sys.modules inside the
# program must not stop the child from reporting and exiting. The report goes through the C JSON encoder
# directly, since json.dumps runs Python code that looks builtins up at call time.
_exit, _getpid, _write = os._exit, os.getpid, os.write
_compile, _exec, _type, _str, _len, _isinstance, _memoryview = compile, exec, type, str, len, isinstance, memoryview
_SystemExit, _BaseException = SystemExit, BaseException
_join = "".join
_encode_json = (json.encoder.c_make_encoder(None, None, json.encoder.encode_basestring_ascii, None, ":", ",",
                                            False, False, True)
                if json.encoder.c_make_encoder is not None else None)


class BoundedText(io.TextIOBase):
    """The child's sys.stdout: keeps the first and the last ``keep`` characters written."""

    def __init__(self, keep: int):
        self._keep = keep
        self._head: list[str] = []
        self._head_len = 0
        self._tail: list[str] = []
        self._tail_len = 0
        self.chars = 0

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if not _isinstance(text, _str):
            raise TypeError(f"write() argument must be str, not {_type(text).__name__}")
        size = _len(text)
        self.chars += size
        start = 0
        room = self._keep - self._head_len
        if room > 0:
            part = text[:room]
            self._head.append(part)
            self._head_len += _len(part)
            start = _len(part)
        if start < size:
            if size - start >= self._keep:  # slice just the end of a huge write, never copy all of it
                self._tail, self._tail_len = [text[-self._keep:]], self._keep
            else:
                self._tail.append(text[start:])
                self._tail_len += size - start
                if self._tail_len > 2 * self._keep:
                    kept = _join(self._tail)[-self._keep:]
                    self._tail, self._tail_len = [kept], _len(kept)
        return size

    def snapshot(self) -> tuple[str, str, int]:
        return _join(self._head), _join(self._tail)[-self._keep:], self.chars


def _refuse_network(event: str, args: tuple, _startswith=str.startswith) -> None:
    # Audit hooks cannot be removed from Python code; seccomp and Landlock refuse the syscalls too.
    if _startswith(event, "socket."):
        raise PermissionError(errno.EPERM, "network access is disabled in the sandbox")


def _describe(exc: BaseException, limit: int = 2000) -> str:
    try:
        text = _str(exc)
    except _BaseException:  # a hostile __str__
        return "<unprintable exception>"
    return text[:limit] if _isinstance(text, _str) else "<unprintable exception>"


def _run_untrusted(source: str, keep: int) -> dict:
    """Execute the program as __main__ with sys.stdout captured; the report of how it ended."""
    me = _getpid()
    out = BoundedText(keep)
    sys.stdout = out
    error_type = error_message = None
    try:
        _exec(_compile(source, "<program>", "exec"), {"__name__": "__main__", "__builtins__": builtins})
    except _SystemExit as exc:  # sys.exit()/exit(): a normal end when the status is 0 or None
        if exc.code is not None and exc.code != 0:
            error_type, error_message = "SystemExit", _describe(exc)
    except _BaseException as exc:
        error_type, error_message = _type(exc).__name__[:200], _describe(exc)
    if _getpid() != me:  # a process the program forked came back here: only the original reports
        _exit(0)
    head, tail, chars = out.snapshot()
    return {"stdout_head": head, "stdout_tail": tail, "stdout_chars": chars,
            "error_type": error_type, "error_message": error_message}


def _send_report(report: dict, _dumps=json.dumps) -> None:
    text = _join(_encode_json(report, 0)) if _encode_json is not None else _dumps(report, ensure_ascii=True)
    payload = text.encode("ascii")
    data = _memoryview(_len(payload).to_bytes(4, "big") + payload)
    while data:
        data = data[_write(REPORT_FD, data):]


class Lockdown:
    """What each child applies to itself before the program runs, prepared by the fork server: every Python
    object a child touches costs it a page copy, so the child does little besides the system calls."""

    def __init__(self, config: dict, identity: tuple[int, int] | None):
        limits = config["limits"]
        self.cpu_margin_s = limits["cpu_margin_s"]
        self.rlimits = [(resource.RLIMIT_AS, (limits["memory_bytes"],) * 2),
                        (resource.RLIMIT_FSIZE, (limits["file_size_bytes"],) * 2),
                        (resource.RLIMIT_NPROC, (limits["max_processes"],) * 2),
                        (resource.RLIMIT_NOFILE, (limits["max_open_files"],) * 2),
                        (resource.RLIMIT_CORE, (0, 0)), (resource.RLIMIT_MEMLOCK, (0, 0)),
                        (resource.RLIMIT_MSGQUEUE, (0, 0))]
        self.identity = identity
        self.devnull = os.open(os.devnull, os.O_RDWR)
        self.max_fd = os.sysconf("SC_OPEN_MAX")
        zero = ctypes.c_ulong(0)
        self._pdeathsig = (ctypes.c_int(PR_SET_PDEATHSIG), ctypes.c_ulong(signal.SIGKILL), zero, zero, zero)
        self._no_new_privs = (ctypes.c_int(PR_SET_NO_NEW_PRIVS), ctypes.c_ulong(1), zero, zero, zero)
        self._capset = (ctypes.byref(_CapHeader(0x20080522, 0)), (_CapData * 2)())  # v3, all sets empty
        self.landlock_abi = landlock_abi() if config.get("landlock", True) else 0
        self._landlock = None
        self._seccomp = None
        program = seccomp_program(platform.machine())
        if program is not None:
            filters = (_SockFilter * len(program))(*[_SockFilter(*ins) for ins in program])
            self._seccomp_filters = filters  # must outlive the struct pointing at it
            self._seccomp = (ctypes.c_int(PR_SET_SECCOMP), ctypes.c_ulong(SECCOMP_MODE_FILTER),
                             ctypes.byref(_SockFprog(len(program), filters)), zero, zero)
        self.applied: dict = {}  # in the child: which best-effort layers took (read by the start-up probe)

    def prepare(self, work_dir: str) -> None:
        """In the fork server, before each fork: the Landlock ruleset for this run's working directory."""
        if self.landlock_abi:
            try:
                ruleset = landlock_ruleset(work_dir, self.landlock_abi)
            except OSError:
                return
            self._landlock = (ctypes.c_long(_SYS_LANDLOCK_RESTRICT_SELF), ctypes.c_int(ruleset), ctypes.c_uint32(0))

    def release(self) -> None:
        """In the fork server, after the fork."""
        if self._landlock is not None:
            os.close(self._landlock[1].value)
            self._landlock = None

    def apply(self, report_fd: int, work_dir: str, timeout_s: float) -> None:
        os.setsid()  # its own process group and session: killable as a group, no controlling terminal
        _checked(_libc.prctl(*self._pdeathsig), "prctl(PDEATHSIG)")
        _checked(_libc.prctl(*self._no_new_privs), "prctl(NO_NEW_PRIVS)")  # Landlock and seccomp need it
        landlocked = self._landlock is not None and _libc.syscall(*self._landlock) == 0  # before its fd closes
        for fd in (0, 1, 2):
            os.dup2(self.devnull, fd)
        os.dup2(report_fd, REPORT_FD)
        os.closerange(REPORT_FD + 1, self.max_fd)
        os.chdir(work_dir)
        cpu_s = max(1, math.ceil(timeout_s + self.cpu_margin_s))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))  # SIGXCPU, then SIGKILL a second later
        for key, value in self.rlimits:
            resource.setrlimit(key, value)
        if self.identity is not None:
            uid, gid = self.identity
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
                raise PermissionError(f"could not become uid {uid} / gid {gid}")
        _checked(_libc.capset(*self._capset), "capset")  # inside a user namespace setuid is not available
        seccomp = self._seccomp is not None and _libc.prctl(*self._seccomp) == 0
        sys.addaudithook(_refuse_network)
        self.applied = {"landlock": self.landlock_abi if landlocked else 0, "seccomp": seccomp}


def child_main(lockdown: Lockdown, source: str, report_fd: int, work_dir: str, timeout_s: float,
               keep: int) -> None:
    """Entry of a freshly forked child; never returns."""
    status = EXIT_LOCKDOWN_FAILED
    try:
        try:
            lockdown.apply(report_fd, work_dir, timeout_s)
        except BaseException as exc:
            report = {"stdout_head": "", "stdout_tail": "", "stdout_chars": 0, "error_type": "SandboxError",
                      "error_message": f"isolation setup failed, program not run: {exc!r}"[:2000]}
        else:
            status = 0
            report = _run_untrusted(source, keep)
        _send_report(report)
    finally:
        _exit(status)


# -------------------------------------------------------------------------------------------- fork server
_PROBE_SOURCE = r"""
import json, os, sys
status = dict(line.split(':', 1) for line in open('/proc/self/status') if ':' in line)
print(json.dumps({'uid': os.getuid(), 'gid': os.getgid(), 'pid': os.getpid(), 'cwd': os.getcwd(),
                  'cap_eff': status['CapEff'].strip(), 'seccomp': status.get('Seccomp', '0').strip(),
                  'no_new_privs': status.get('NoNewPrivs', '0').strip(),
                  'applied': sys.modules[MODULE].SERVER.lockdown.applied,
                  'stdlib_readable': os.access(os.path.dirname(os.__file__), os.R_OK | os.X_OK)}))
"""

# Trusted warm-up run once in the fork server: loads the lazily imported parts of SymPy/NumPy that step
# programs reach first, so that every child starts with them in memory.
_WARMUP_SOURCE = r"""
import math, fractions, itertools, collections, decimal
import numpy as np
import sympy as sp
x, y = sp.symbols('x y')
sp.solve(sp.Eq(x**2 - 5*x + 6, 0), x)
sp.solve([sp.Eq(x + y, 10), sp.Eq(x - y, 2)], [x, y])
sp.simplify((x**2 - 1) / (x - 1)); sp.factor(x**2 - 1); sp.expand((x + 1)**3)
sp.nsimplify(0.5); sp.N(sp.pi, 10); sp.integrate(x**2, (x, 0, 1)); sp.diff(sp.sin(x), x)
sp.Rational(1, 3) + sp.sqrt(2); sp.Matrix([[1, 2], [3, 4]]).det(); sp.binomial(10, 3); sp.isprime(97)
str(sp.Rational(1, 3)); sp.latex(x**2)
a = np.array([[2.0, 1.0], [1.0, 3.0]])
np.linalg.solve(a, np.array([1.0, 2.0])); np.linalg.det(a); np.mean(a); np.arange(10).sum(); str(a)
fractions.Fraction(1, 3) + fractions.Fraction(1, 6); math.comb(10, 3); list(itertools.permutations(range(3)))
decimal.Decimal('1.10') + decimal.Decimal('2.2'); collections.Counter('abca')
"""

_SIGNAL_NAMES = {int(s): s.name for s in signal.Signals}
SERVER: "ForkServer | None" = None  # the running fork server (the start-up probe reads its lockdown state)


class ForkServer:
    def __init__(self, config: dict, namespaces: dict):
        self.config = config
        self.identity = tuple(config["identity"]) if config.get("identity") and os.geteuid() == 0 else None
        self.isolation = dict(namespaces)
        self.private_tmp = False
        self.work_dir = "/tmp"
        self.lockdown: Lockdown | None = None
        self._current: int | None = None  # pid of the last child

    # ---- start-up
    def start(self) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a same-uid child (user-namespace mode) must not stop us
        try:
            with open("/proc/self/oom_score_adj", "w") as f:  # inherited: the OOM killer takes programs first
                f.write("1000")
        except OSError:
            pass
        if not self.isolation["pid_namespace"]:
            prctl(PR_SET_CHILD_SUBREAPER, 1)  # orphans of a program come back to us to be killed
        if self.isolation["mount_namespace"]:
            self._set_up_mounts()
        else:
            self.work_dir = self._make_host_work_dir()
        self.lockdown = Lockdown(self.config, self.identity)
        # The children's environment, set once here: nothing of the host's, the same paths for every run.
        os.environ.clear()
        os.environ.update({"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": self.work_dir, "TMPDIR": self.work_dir,
                           "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "OPENBLAS_NUM_THREADS": "1",
                           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
        tempfile.tempdir = self.work_dir
        self._preload()
        gc.collect()
        gc.freeze()  # the collector would otherwise write to (and so copy) every inherited object in each child
        self._probe()

    def _set_up_mounts(self) -> None:
        mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount propagates back to the host
        if self.identity is not None:
            self.isolation["exposed_for_imports"] = _expose_to_others(_import_roots())
        try:  # one trial of the per-run tmpfs decides how working directories are made
            self._mount_tmp()
            umount_detached("/tmp")
            self.private_tmp = True
        except OSError:
            self.work_dir = self._make_host_work_dir()
        try:
            make_mounts_readonly("/")
            self.isolation["readonly_root"] = True
            if not self.private_tmp:  # the one writable place: a bind mount of itself, remounted read-write
                mount(self.work_dir, self.work_dir, None, MS_BIND)
                mount(None, self.work_dir, None, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV)
        except OSError:
            self.isolation["readonly_root"] = False
        self.isolation["private_proc"] = False
        if self.isolation["pid_namespace"]:
            try:
                mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
                self.isolation["private_proc"] = True
            except OSError:
                pass

    def _make_host_work_dir(self) -> str:
        """Without a private tmpfs: one private directory in the host's temp dir, emptied after every run."""
        work_dir = tempfile.mkdtemp(prefix="rstar-sandbox-")
        if self.identity is not None:
            os.chown(work_dir, *self.identity)
        return work_dir

    def _preload(self) -> None:
        loaded, failed = [], []
        for name in self.config["preload"]:
            try:
                importlib.import_module(name)
                loaded.append(name)
            except Exception:  # e.g. scipy not installed: a program may still import what it needs
                failed.append(name)
        self.isolation["preloaded"], self.isolation["preload_failed"] = loaded, failed
        if self.config.get("warmup", True) and {"numpy", "sympy"} <= set(loaded):
            saved = sys.stdout
            sys.stdout = io.StringIO()
            try:
                exec(compile(_WARMUP_SOURCE, "<warmup>", "exec"), {"__name__": "__warmup__"})
            finally:
                sys.stdout = saved

    def _probe(self) -> None:
        """Run a program that reports on itself through the full path; refuse to serve unless the privilege
        drop happened and no capability survived."""
        global SERVER
        SERVER = self
        reply = self.run({"id": -1, "source": f"MODULE = {__name__!r}\n{_PROBE_SOURCE}", "timeout_s": 30.0})
        self.cleanup()
        if reply["failed"]:
            raise RuntimeError(f"sandbox self-test failed: {reply['error_type']}: {reply['error_message']}")
        seen = json.loads(reply["stdout_head"])
        if self.identity is not None and (seen["uid"], seen["gid"]) != self.identity:
            raise RuntimeError(f"sandbox self-test ran as uid {seen['uid']}, expected {self.identity[0]}")
        if int(seen["cap_eff"], 16) != 0:
            raise RuntimeError(f"sandbox self-test kept capabilities {seen['cap_eff']}")
        self.isolation.update(
            uid=seen["uid"], gid=seen["gid"], drops_privileges=self.identity is not None,
            no_new_privs=seen["no_new_privs"] == "1", seccomp=seen["seccomp"] == "2" and seen["applied"]["seccomp"],
            landlock_abi=seen["applied"]["landlock"], private_tmp=self.private_tmp,
            host_work_dir=None if self.private_tmp else self.work_dir, program_pid=seen["pid"],
            stdlib_readable=seen["stdlib_readable"], python=platform.python_version())

    # ---- serving
    def serve(self, in_fd: int, out_fd: int) -> None:
        while True:
            frame = read_frame(in_fd)
            if frame is None:
                if not self.private_tmp:
                    shutil.rmtree(self.work_dir, ignore_errors=True)
                return
            write_frame(out_fd, self.run(json.loads(frame)))
            self.cleanup()  # after replying: the host can queue the next request meanwhile

    def run(self, request: dict) -> dict:
        timeout_s = float(request["timeout_s"])
        self._prepare_work_dir()
        self.lockdown.prepare(self.work_dir)
        read_fd, write_fd = os.pipe()
        hard_exit = os._exit  # a local: the program can rebind module attributes, not this frame's variables
        started = time.monotonic()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(read_fd)
                child_main(self.lockdown, request["source"], write_fd, self.work_dir, timeout_s,
                           self.config["output_keep_chars"])
            finally:  # the child never continues into the fork server's code, whatever the program did
                hard_exit(EXIT_LOCKDOWN_FAILED)
        os.close(write_fd)
        self.lockdown.release()
        self._current = pid
        try:
            outcome, detail = self._await(pid, read_fd, started + timeout_s)
        finally:
            os.close(read_fd)
        reply = self._reply(outcome, detail, timeout_s)
        reply.update(id=request["id"], wall_s=time.monotonic() - started)
        return reply

    def _await(self, pid: int, read_fd: int, deadline: float) -> tuple[str, bytes | int | None]:
        """Wait for the child's report, its exit or the wall-clock deadline, whichever comes first:
        ("report", payload), ("exited", wait status), ("timeout", None) or ("oversized", None)."""
        limit = self.config["max_report_bytes"] + 4
        os.set_blocking(read_fd, False)
        buffer = bytearray()
        poller = select.poll()
        poller.register(read_fd, select.POLLIN)
        try:
            exit_fd = os.pidfd_open(pid)
            poller.register(exit_fd, select.POLLIN)
        except (AttributeError, OSError):
            exit_fd = None  # before Linux 5.3: look for the exit every few milliseconds
        try:
            while True:
                if _frame_complete(buffer):
                    return "report", _first_frame(buffer)
                if len(buffer) > limit:
                    return "oversized", None
                status = None
                if exit_fd is None:
                    done, wait_status = os.waitpid(pid, os.WNOHANG)
                    status = wait_status if done == pid else None
                if status is None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return "timeout", None
                    wait_ms = left * 1000 if exit_fd is not None else min(left * 1000, 5)
                    for fd, _ in poller.poll(math.ceil(wait_ms)):
                        if fd == read_fd:
                            if not _read_available(read_fd, buffer, limit):
                                poller.unregister(read_fd)  # end of file: only the exit is left to see
                        else:
                            status = _wait_status(pid)
                if status is not None:
                    _read_available(read_fd, buffer, limit)
                    if _frame_complete(buffer):
                        return "report", _first_frame(buffer)
                    return "exited", status
        finally:
            if exit_fd is not None:
                os.close(exit_fd)

    def _reply(self, outcome: str, detail: bytes | int | None, timeout_s: float) -> dict:
        reply = {"stdout_head": "", "stdout_tail": "", "stdout_chars": 0, "failed": True, "timed_out": False,
                 "error_type": None, "error_message": None}
        if outcome == "timeout":
            reply.update(timed_out=True, error_type="TimeoutError", error_message=(
                f"Execution of the code snippet has timed out for exceeding {timeout_s:g} seconds."))
        elif outcome == "report":
            report = validated_report(detail, self.config["output_keep_chars"])
            if report is None:
                reply.update(error_type="SandboxError", error_message="the program's process sent a malformed report")
            else:
                reply.update(report, failed=report["error_type"] is not None)
        elif outcome == "oversized":
            reply.update(error_type="SandboxError", error_message="the program's report exceeded its size limit")
        elif os.WIFSIGNALED(detail):
            sig = os.WTERMSIG(detail)
            if sig == signal.SIGXCPU:
                reply.update(timed_out=True, error_type="TimeoutError",
                             error_message="the program exceeded its CPU time limit")
            else:
                name = _SIGNAL_NAMES.get(sig, f"signal {sig}")
                reply.update(error_type="KilledBySignal",
                             error_message=f"the program's process was killed by {name} ({signal.strsignal(sig)})")
        elif os.waitstatus_to_exitcode(detail) == EXIT_LOCKDOWN_FAILED:
            reply.update(error_type="SandboxError", error_message="isolation setup failed; the program did not run")
        else:
            code = os.waitstatus_to_exitcode(detail)
            reply.update(error_type="ExitedEarly",
                         error_message=f"the program's process exited with status {code} before the program ended")
        return reply

    # ---- between runs
    def cleanup(self) -> None:
        """Kill every process the last program left behind and drop its working directory."""
        if self.isolation["pid_namespace"]:
            _kill_namespace()
        else:
            _kill_descendants(self._current)
        if self.private_tmp:
            umount_detached("/tmp")
        else:
            _clear_directory(self.work_dir)

    def _prepare_work_dir(self) -> None:
        if self.private_tmp:
            self._mount_tmp()

    def _mount_tmp(self) -> None:
        uid, gid = self.identity if self.identity is not None else (os.getuid(), os.getgid())
        size = self.config["limits"]["tmpfs_bytes"]
        mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
              f"size={size},nr_inodes=4096,mode=700,uid={uid},gid={gid}")


def _import_roots() -> list[str]:
    """Directories a program's imports read from: the interpreter's prefixes and every sys.path entry."""
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, *sys.path}
    return sorted(os.path.realpath(p) for p in roots if p and os.path.isdir(p))


def _blocked_ancestor(path: str) -> tuple[str, str] | None:
    """The topmost directory on ``path`` that other users cannot search, and the next component under it."""
    parts = path.strip("/").split("/")
    for depth in range(len(parts)):
        directory = "/" + "/".join(parts[:depth])
        if not os.stat(directory).st_mode & 0o001:
            return directory, parts[depth]
    return None


def _expose_to_others(paths: list[str]) -> list[str]:
    """In our mount namespace, make ``paths`` reachable by the unprivileged uid when an ancestor directory is
    closed to others (e.g. an interpreter under /root): an empty world-searchable tmpfs goes over the closed
    directory and only the entries on the way to ``paths`` are bind-mounted back. Returns the exposed entries."""
    exposed = []
    for _ in range(8):  # one closed level per round, top-down
        needed: dict[str, set[str]] = {}
        for path in paths:
            blocked = _blocked_ancestor(path)
            if blocked is not None:
                needed.setdefault(blocked[0], set()).add(blocked[1])
        if not needed:
            return exposed
        for directory, names in needed.items():
            handles = {name: os.open(os.path.join(directory, name), os.O_PATH | os.O_CLOEXEC) for name in names}
            try:
                mount("tmpfs", directory, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
                for name, fd in handles.items():
                    target = os.path.join(directory, name)
                    if os.path.isdir(f"/proc/self/fd/{fd}"):
                        os.mkdir(target)
                    else:
                        open(target, "w").close()
                    mount(f"/proc/self/fd/{fd}", target, None, MS_BIND | MS_REC)
                    exposed.append(target)
            finally:
                for fd in handles.values():
                    os.close(fd)
    raise RuntimeError(f"could not expose {paths} to the sandbox uid")


def _clear_directory(path: str) -> None:
    """Remove everything inside ``path`` (never following links), making unreadable directories readable."""
    def make_removable(function, target, exc_info):
        os.chmod(os.path.dirname(target) if function is not os.open else target, 0o700)
        function(target)

    for entry in os.scandir(path):
        try:
            if entry.is_dir(follow_symlinks=False):
                os.chmod(entry.path, 0o700)
                shutil.rmtree(entry.path, onerror=make_removable)
            else:
                os.unlink(entry.path)
        except OSError:
            pass


def _frame_complete(buffer: bytearray) -> bool:
    return len(buffer) >= 4 and len(buffer) >= 4 + int.from_bytes(buffer[:4], "big")


def _first_frame(buffer: bytearray) -> bytes:
    return bytes(buffer[4:4 + int.from_bytes(buffer[:4], "big")])


def _read_available(fd: int, buffer: bytearray, limit: int) -> bool:
    """Append what can be read now (up to just past ``limit``); False at end of file."""
    while len(buffer) <= limit:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            return True
        if not chunk:
            return False
        buffer += chunk
    return True


def _wait_status(pid: int) -> int:
    while True:
        try:
            return os.waitpid(pid, 0)[1]
        except InterruptedError:
            continue


_REPORT_KEYS = {"stdout_head", "stdout_tail", "stdout_chars", "error_type", "error_message"}


def validated_report(payload: bytes, keep: int) -> dict | None:
    """The child's report if it has exactly the expected shape, strings clipped and made valid UTF-8."""
    try:
        report = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    if not isinstance(report, dict) or set(report) != _REPORT_KEYS:
        return None
    clean = {}
    for key, limit in (("stdout_head", keep), ("stdout_tail", keep), ("error_type", 200), ("error_message", 2000)):
        value = report[key]
        if value is None and key.startswith("error"):
            clean[key] = None
        elif isinstance(value, str):
            clean[key] = value[:limit].encode("utf-8", "replace").decode("utf-8")
        else:
            return None
    chars = report["stdout_chars"]
    if type(chars) is not int or chars < len(clean["stdout_head"]) + len(clean["stdout_tail"]):
        return None
    clean["stdout_chars"] = chars
    return clean


def _kill_namespace(timeout_s: float = 10.0) -> None:
    """As pid 1 of the namespace: SIGKILL everything else in it. A process with a fatal signal pending never
    runs user code again and cannot fork, so the next program may start at once; the exit of the program's
    own process is left to finish in the background (reaped next time). Leftovers of a program that forked
    are reaped now, so that they stop counting against the next program's process limit."""
    try:
        os.kill(-1, signal.SIGKILL)
    except ProcessLookupError:
        return
    if len(_children()) > 1:
        _reap_all(timeout_s)
    else:
        _reap_some()


def _kill_descendants(pid: int, timeout_s: float = 10.0) -> None:
    """Without a PID namespace: kill the program's process group, then whatever was reparented to us (we are
    a child subreaper, so every surviving descendant ends up our child), until none is left."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    deadline = time.monotonic() + timeout_s
    while True:
        children = _children()
        if not children and not _reap_some():
            return
        for child in children:
            try:
                os.kill(child, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        _reap_all(max(0.0, deadline - time.monotonic()))
        if time.monotonic() > deadline:
            raise RuntimeError("could not kill the processes a program left behind")


def _children() -> list[int]:
    me = os.getpid()
    try:
        with open(f"/proc/{me}/task/{me}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        pass
    found = []  # kernels without CONFIG_PROC_CHILDREN: scan every process's parent
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == me:
                        found.append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    return found


def _reap_some() -> bool:
    """Reap exited children without blocking; True if any child is left."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return False
        if pid == 0:
            return True


def _reap_all(timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while _reap_some():
        if time.monotonic() > deadline:
            raise RuntimeError("processes a program left behind did not die")
        time.sleep(0.0002)


# --------------------------------------------------------------------------------------------------- main
def main() -> None:
    frame = read_frame(0)
    if frame is None:
        return
    config = json.loads(frame)
    sys.path[:] = config["sys_path"]
    try:
        server = ForkServer(config, enter_namespaces(config["namespaces"]))
        server.start()
    except BaseException:
        write_frame(1, {"fatal": traceback.format_exc(limit=8)})
        os._exit(1)
    write_frame(1, {"ready": server.isolation})
    server.serve(0, 1)


if __name__ == "__main__":
    main()
