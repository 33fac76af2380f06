"""What each forked child applies to itself before the program runs: its own session, resource limits, no new
privileges, Landlock, an unprivileged uid, no capabilities, the seccomp filter, the network audit hook, and a file
descriptor table of just /dev/null and the report pipe.

Standard library only: ``sandbox_worker.py`` loads it as a top-level module, never through the package.
"""
from __future__ import annotations

import ctypes
import errno
import math
import os
import platform
import resource
import signal
import site
import sys
import sysconfig

if __package__:
    from . import sandbox_linux as linux
    from .sandbox_seccomp import SeccompFilter
else:  # loaded by the worker as a top-level module
    import sandbox_linux as linux
    from sandbox_seccomp import SeccompFilter

# The child's file descriptors: /dev/null as 0, 1 and 2, the pipe to the fork server as REPORT_FD, nothing else.
REPORT_FD = 3


def _refuse_network(event: str, args: tuple, _startswith=str.startswith) -> None:
    # Audit hooks cannot be removed from Python code; seccomp and Landlock refuse the syscalls too.
    if _startswith(event, "socket."):
        raise PermissionError(errno.EPERM, "network access is disabled in the sandbox")


def readable_roots() -> tuple[str, ...]:
    """What a program may read besides its working directory: the interpreter's libraries (standard library,
    site-packages), the system's shared libraries, /proc and the random and zero devices. Not the repository,
    home directories, problem files (the answers) or checkpoints."""
    paths = sysconfig.get_paths()
    roots = {paths[key] for key in ("stdlib", "platstdlib", "purelib", "platlib")} | set(site.getsitepackages())
    roots |= {"/usr/lib", "/usr/lib64", "/lib", "/lib64", "/usr/local/lib", "/usr/share/zoneinfo", "/etc/ld.so.cache",
              "/proc", "/dev/urandom", "/dev/zero"}
    return tuple(sorted({os.path.realpath(p) for p in roots if os.path.exists(p)}))


class Lockdown:
    """Prepared by the fork server, applied by each child: every Python object a child touches costs it a page
    copy, so the child does little besides the system calls."""

    def __init__(self, limits: dict, identity: tuple[int, int] | None):
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
        self._pdeathsig = (ctypes.c_int(linux.PR_SET_PDEATHSIG), ctypes.c_ulong(signal.SIGKILL), zero, zero, zero)
        self._no_new_privs = (ctypes.c_int(linux.PR_SET_NO_NEW_PRIVS), ctypes.c_ulong(1), zero, zero, zero)
        self._capset = (ctypes.byref(linux.CapHeader(linux.CAPABILITY_VERSION_3, 0)), (linux.CapData * 2)())  # none
        self.landlock_abi = linux.landlock_abi()
        self.read_roots = readable_roots()
        self._landlock = None
        self._seccomp = SeccompFilter(platform.machine())
        self.applied: dict = {}  # in the child: which best-effort layers took (read by the start-up probe)

    def prepare(self, work_dir: str) -> None:
        """In the fork server, before each fork: the Landlock ruleset for this run's working directory."""
        if self.landlock_abi:
            try:
                ruleset = linux.landlock_ruleset(work_dir, self.landlock_abi, self.read_roots)
            except OSError:
                return
            self._landlock = (ctypes.c_long(linux.SYS_LANDLOCK_RESTRICT_SELF), ctypes.c_int(ruleset),
                              ctypes.c_uint32(0))

    def release(self) -> None:
        """In the fork server, after the fork."""
        if self._landlock is not None:
            os.close(self._landlock[1].value)
            self._landlock = None

    def apply(self, report_fd: int, work_dir: str, timeout_s: float) -> None:
        """In the child: lock it down, with ``report_fd`` moved to REPORT_FD; raises where a required layer fails."""
        libc = linux.libc
        parent = os.getppid()
        os.setsid()  # its own process group and session: killable as a group, no controlling terminal
        linux.checked(libc.prctl(*self._no_new_privs), "prctl(NO_NEW_PRIVS)")  # Landlock and seccomp need it
        landlocked = self._landlock is not None and libc.syscall(*self._landlock) == 0  # before its fd closes
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
        # After the uid change, which clears it: the program dies with the fork server.
        linux.checked(libc.prctl(*self._pdeathsig), "prctl(PDEATHSIG)")
        if os.getppid() != parent:  # the fork server died before the signal was armed
            os._exit(1)
        linux.checked(libc.capset(*self._capset), "capset")  # inside a user namespace setuid is not available
        seccomp = self._seccomp.install()
        sys.addaudithook(_refuse_network)
        self.applied = {"landlock": self.landlock_abi if landlocked else 0, "seccomp": seccomp}
