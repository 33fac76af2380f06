"""Linux system calls the standard library lacks, through ctypes: unshare, mount, umount2, mount_setattr, prctl,
capset, Landlock and madvise. Each wrapper raises OSError where the kernel refuses.

Standard library only: ``sandbox_worker.py`` loads it as a top-level module, never through the package.
"""
from __future__ import annotations

import ctypes
import os
import struct

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET, CLONE_NEWCGROUP = 0x10000000, 0x20000000, 0x40000000, 0x02000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 0x2, 0x4, 0x8, 0x20, 0x1000, 0x4000, 0x40000
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_SECCOMP, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 22, 36, 38
_SYS_MOUNT_SETATTR = 442  # the same number on x86_64 and in the asm-generic table (aarch64)
_AT_FDCWD, _AT_RECURSIVE, _MOUNT_ATTR_RDONLY = -100, 0x8000, 0x1
_MADV_HUGEPAGE, _MADV_COLLAPSE, _HUGE_PAGE_BYTES = 14, 25, 2 << 20


def checked(result: int, what: str) -> int:
    """``result`` of a libc call, or OSError from errno when it is -1."""
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def unshare(flags: int) -> None:
    checked(libc.unshare(ctypes.c_int(flags)), "unshare")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    def encode(text):
        return None if text is None else text.encode()
    checked(libc.mount(encode(source), encode(target), encode(fstype), flags, encode(data)), f"mount {target}")


def umount_detached(target: str) -> None:
    checked(libc.umount2(target.encode(), ctypes.c_int(MNT_DETACH)), f"umount {target}")


def collapse_anonymous_memory() -> int:
    """Back this process's private anonymous memory (the Python heap) with transparent huge pages where the
    kernel allows: madvise(MADV_HUGEPAGE), then MADV_COLLAPSE (Linux 6.1+) to collapse what is already there.
    For a fork server this makes each fork copy one page-table entry per 2 MiB instead of 512, and each child's
    exit tear down as few; a child's first write to a huge page splits just its own mapping. Best effort: the
    bytes of the ranges madvised (some 2 MiB blocks in them may stay small pages), 0 where unsupported."""
    try:
        with open("/proc/self/maps") as f:
            lines = f.read().splitlines()
    except OSError:
        return 0
    done = 0
    for line in lines:
        fields = line.split()
        if len(fields) < 5 or (len(fields) > 5 and fields[5] != "[heap]"):
            continue  # file mappings, stacks, vdso and the like
        if not (fields[1].startswith("rw") and fields[1].endswith("p")):
            continue
        start, end = (int(x, 16) for x in fields[0].split("-"))
        start = (start + _HUGE_PAGE_BYTES - 1) & ~(_HUGE_PAGE_BYTES - 1)
        end &= ~(_HUGE_PAGE_BYTES - 1)
        if end <= start or libc.madvise(start, end - start, _MADV_HUGEPAGE) != 0:
            continue
        libc.madvise(start, end - start, _MADV_COLLAPSE)  # fails for blocks it could not fill; others collapse
        done += end - start
    return done


def make_mounts_readonly(path: str = "/") -> None:
    """Every mount at and below ``path`` read-only, in this mount namespace only (mount_setattr(2))."""
    attr = struct.pack("QQQQ", _MOUNT_ATTR_RDONLY, 0, 0, 0)
    checked(libc.syscall(ctypes.c_long(_SYS_MOUNT_SETATTR), ctypes.c_int(_AT_FDCWD), path.encode(),
                         ctypes.c_uint(_AT_RECURSIVE), ctypes.c_char_p(attr), ctypes.c_size_t(len(attr))),
            "mount_setattr")


def prctl(option: int, value: int = 0) -> None:
    checked(libc.prctl(ctypes.c_int(option), ctypes.c_ulong(value), ctypes.c_ulong(0), ctypes.c_ulong(0),
                       ctypes.c_ulong(0)), f"prctl({option})")


class CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


CAPABILITY_VERSION_3 = 0x20080522  # capset(2) with two CapData: all 64 capabilities


# ----------------------------------------------------------------------------------------------- landlock
# Landlock (Linux 5.13+, unprivileged): file writes only beneath the working directory, reads only there and in
# the interpreter's and the system's libraries; with ABI 4+ no TCP bind/connect; with ABI 6+ no signals to
# processes outside the program's own. Holds without root or namespaces.
SYS_LANDLOCK_RESTRICT_SELF = 446
_SYS_LANDLOCK_CREATE_RULESET, _SYS_LANDLOCK_ADD_RULE = 444, 445
_LANDLOCK_RULE_PATH_BENEATH = 1
_FS_WRITE_FILE, _FS_READ_FILE, _FS_READ_DIR = 1 << 1, 1 << 2, 1 << 3
_FS_WRITES_V1 = sum(1 << bit for bit in (1, 4, 5, 6, 7, 8, 9, 10, 11, 12))  # write, remove, make-anything
_FS_REFER, _FS_TRUNCATE = 1 << 13, 1 << 14                                     # ABI 2, ABI 3
_NET_BIND_TCP, _NET_CONNECT_TCP = 1 << 0, 1 << 1                               # ABI 4
_SCOPE_ABSTRACT_UNIX_SOCKET, _SCOPE_SIGNAL = 1 << 0, 1 << 1                    # ABI 6


def landlock_abi() -> int:
    """The kernel's Landlock ABI version; 0 without Landlock."""
    version = libc.syscall(ctypes.c_long(_SYS_LANDLOCK_CREATE_RULESET), None, ctypes.c_size_t(0),
                           ctypes.c_uint32(1))  # LANDLOCK_CREATE_RULESET_VERSION
    return max(0, version)


def landlock_ruleset(write_root: str, abi: int, read_roots: tuple[str, ...] = ()) -> int:
    """A ruleset fd allowing writes only beneath ``write_root`` and to /dev/null, reads only there, from
    /dev/null and beneath ``read_roots`` (directories or files); TCP and outside signals denied where the ABI has
    them. A rule on a mount point is hidden by what is later mounted over it, so ``write_root`` must be the
    directory as the program will see it. Enforced by syscall(SYS_LANDLOCK_RESTRICT_SELF, fd, 0) after
    PR_SET_NO_NEW_PRIVS."""
    writes = _FS_WRITES_V1 | (_FS_REFER if abi >= 2 else 0) | (_FS_TRUNCATE if abi >= 3 else 0)
    reads = _FS_READ_FILE | _FS_READ_DIR
    fields = [writes | reads]
    if abi >= 4:
        fields.append(_NET_BIND_TCP | _NET_CONNECT_TCP)  # handled with no rule: every bind/connect denied
    if abi >= 6:
        fields.append(_SCOPE_ABSTRACT_UNIX_SOCKET | _SCOPE_SIGNAL)
    attr = struct.pack(f"{len(fields)}Q", *fields)
    ruleset = checked(libc.syscall(ctypes.c_long(_SYS_LANDLOCK_CREATE_RULESET), ctypes.c_char_p(attr),
                                   ctypes.c_size_t(len(attr)), ctypes.c_uint32(0)), "landlock_create_ruleset")
    device_writes = _FS_WRITE_FILE | (_FS_TRUNCATE if abi >= 3 else 0)
    rules = [(write_root, writes | reads), (os.devnull, device_writes | _FS_READ_FILE)]
    # A read root the program cannot see (a venv under /tmp, hidden by the per-run tmpfs) gets no rule.
    rules += [(path, reads if os.path.isdir(path) else _FS_READ_FILE) for path in read_roots if os.path.exists(path)]
    try:
        for path, allowed in rules:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                rule = struct.pack("=Qi", allowed, fd)  # struct landlock_path_beneath_attr is packed
                checked(libc.syscall(ctypes.c_long(_SYS_LANDLOCK_ADD_RULE), ctypes.c_int(ruleset),
                                     ctypes.c_int(_LANDLOCK_RULE_PATH_BENEATH), ctypes.c_char_p(rule),
                                     ctypes.c_uint32(0)), f"landlock_add_rule {path}")
            finally:
                os.close(fd)
    except OSError:
        os.close(ruleset)
        raise
    return ruleset
