"""The sandbox's seccomp filter: a classic-BPF program that refuses the system calls a math program never needs.

Standard library only: ``sandbox_worker.py`` loads it as a top-level module, never through the package.
"""
from __future__ import annotations

import ctypes
import errno

if __package__:
    from . import sandbox_linux as linux
else:  # loaded by the worker as a top-level module
    import sandbox_linux as linux

SECCOMP_MODE_FILTER = 2

# Syscalls a math program never needs that reach the network, other processes' memory or the kernel's
# namespace, mount, key and module machinery, or System V IPC (shared memory no process owns: it outlives the
# program, escapes its memory limit and carries state to the next one), plus clone with namespace flags,
# kill(-1) and terminal input injection, checked by argument. Numbers checked against both kernel syscall tables.
_DENIED_SYSCALLS = {
    "x86_64": dict(socket=41, socketpair=53, ptrace=101, process_vm_readv=310, process_vm_writev=311,
                   io_uring_setup=425, io_uring_enter=426, io_uring_register=427, bpf=321, perf_event_open=298,
                   userfaultfd=323, unshare=272, setns=308, mount=165, umount2=166, pivot_root=155, chroot=161,
                   keyctl=250, add_key=248, request_key=249, kexec_load=246, kexec_file_load=320, init_module=175,
                   finit_module=313, delete_module=176, reboot=169, swapon=167, swapoff=168, acct=163,
                   name_to_handle_at=303, open_by_handle_at=304, open_tree=428, move_mount=429, fsopen=430,
                   fsconfig=431, fsmount=432, fspick=433, mount_setattr=442,
                   shmget=29, shmat=30, shmctl=31, shmdt=67, semget=64, semop=65, semctl=66, semtimedop=220,
                   msgget=68, msgsnd=69, msgrcv=70, msgctl=71),
    "aarch64": dict(socket=198, socketpair=199, ptrace=117, process_vm_readv=270, process_vm_writev=271,
                    io_uring_setup=425, io_uring_enter=426, io_uring_register=427, bpf=280, perf_event_open=241,
                    userfaultfd=282, unshare=97, setns=268, mount=40, umount2=39, pivot_root=41, chroot=51,
                    keyctl=219, add_key=217, request_key=218, kexec_load=104, kexec_file_load=294,
                    init_module=105, finit_module=273, delete_module=106, reboot=142, swapon=224, swapoff=225,
                    acct=89, name_to_handle_at=264, open_by_handle_at=265, open_tree=428, move_mount=429,
                    fsopen=430, fsconfig=431, fsmount=432, fspick=433, mount_setattr=442,
                    msgget=186, msgctl=187, msgrcv=188, msgsnd=189, semget=190, semctl=191, semtimedop=192,
                    semop=193, shmget=194, shmctl=195, shmat=196, shmdt=197),
}
_ARCH = {"x86_64": (0xC000003E, dict(clone=56, clone3=435, kill=62, ioctl=16)),
         "aarch64": (0xC00000B7, dict(clone=220, clone3=435, kill=129, ioctl=29))}
_TIOCSTI, _TIOCLINUX = 0x5412, 0x541C  # push input into a terminal: a classic way out through the user's shell
_NAMESPACE_CLONE_FLAGS = (linux.CLONE_NEWNS | linux.CLONE_NEWUTS | linux.CLONE_NEWIPC | linux.CLONE_NEWUSER
                          | linux.CLONE_NEWPID | linux.CLONE_NEWNET | linux.CLONE_NEWCGROUP)
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


class SeccompFilter:
    """The filter for ``machine`` built once, so that installing it in a forked child is one prctl call."""

    def __init__(self, machine: str):
        program = seccomp_program(machine)
        self.available = program is not None
        if self.available:
            zero = ctypes.c_ulong(0)
            self._filters = (_SockFilter * len(program))(*[_SockFilter(*ins) for ins in program])  # outlives _args
            self._args = (ctypes.c_int(linux.PR_SET_SECCOMP), ctypes.c_ulong(SECCOMP_MODE_FILTER),
                          ctypes.byref(_SockFprog(len(program), self._filters)), zero, zero)

    def install(self) -> bool:
        """Filter this thread and its future children (needs no-new-privileges first); False if refused."""
        return self.available and linux.libc.prctl(*self._args) == 0
