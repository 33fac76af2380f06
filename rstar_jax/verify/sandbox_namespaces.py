"""The sandbox worker's namespaces and mounts: entering new namespaces (the launcher), then, inside the new mount
namespace, a private read-only view of the file system, a private /proc and a private tmpfs per run.

Standard library only: ``sandbox_worker.py`` loads it as a top-level module, never through the package.
"""
from __future__ import annotations

import os
import signal
import sys

if __package__:
    from . import sandbox_linux as linux
else:  # loaded by the worker as a top-level module
    import sandbox_linux as linux


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
        for key, flag in (("mount_namespace", linux.CLONE_NEWNS), ("network_namespace", linux.CLONE_NEWNET),
                          ("ipc_namespace", linux.CLONE_NEWIPC), ("uts_namespace", linux.CLONE_NEWUTS),
                          ("pid_namespace", linux.CLONE_NEWPID)):
            try:
                linux.unshare(flag)
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
        linux.unshare(linux.CLONE_NEWUSER)
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
        linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
        return
    os.close(0)  # keep no copy of the pipes: the host must see end of file when the fork server exits
    os.close(1)
    status = os.waitpid(child, 0)[1]
    os._exit(os.waitstatus_to_exitcode(status) & 0xFF if os.WIFEXITED(status) else 1)


# ------------------------------------------------------------------------------------------------- mounts
def make_mounts_private() -> None:
    """Nothing mounted in this mount namespace from now on propagates back to the host's."""
    linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)


def make_root_readonly(writable_dir: str | None) -> bool:
    """Every mount read-only except ``writable_dir`` (a bind mount of itself, remounted read-write); False where
    the kernel refuses."""
    try:
        linux.make_mounts_readonly("/")
        if writable_dir is not None:
            linux.mount(writable_dir, writable_dir, None, linux.MS_BIND)
            linux.mount(None, writable_dir, None, linux.MS_REMOUNT | linux.MS_BIND | linux.MS_NOSUID | linux.MS_NODEV)
    except OSError:
        return False
    return True


def mount_private_proc() -> bool:
    """A /proc of our own PID namespace; False where the kernel refuses."""
    try:
        linux.mount("proc", "/proc", "proc", linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC)
    except OSError:
        return False
    return True


def mount_tmpfs(target: str, size_bytes: int, uid: int, gid: int) -> None:
    """A fresh, empty tmpfs on ``target`` owned by ``uid``/``gid``; no devices, set-uid files or executables."""
    linux.mount("tmpfs", target, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC,
                f"size={size_bytes},nr_inodes=4096,mode=700,uid={uid},gid={gid}")


def import_roots() -> list[str]:
    """Directories a program's imports read from: the interpreter's prefixes and every sys.path entry."""
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, *sys.path}
    return sorted(os.path.realpath(p) for p in roots if p and os.path.isdir(p))


def expose_to_others(paths: list[str]) -> list[str]:
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
                linux.mount("tmpfs", directory, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, "size=1m,mode=755")
                for name, fd in handles.items():
                    target = os.path.join(directory, name)
                    if os.path.isdir(f"/proc/self/fd/{fd}"):
                        os.mkdir(target)
                    else:
                        open(target, "w").close()
                    linux.mount(f"/proc/self/fd/{fd}", target, None, linux.MS_BIND | linux.MS_REC)
                    exposed.append(target)
            finally:
                for fd in handles.values():
                    os.close(fd)
    raise RuntimeError(f"could not expose {paths} to the sandbox uid")


def _blocked_ancestor(path: str) -> tuple[str, str] | None:
    """The topmost directory on ``path`` that other users cannot search, and the next component under it."""
    parts = path.strip("/").split("/")
    for depth in range(len(parts)):
        directory = "/" + "/".join(parts[:depth])
        if not os.stat(directory).st_mode & 0o001:
            return directory, parts[depth]
    return None
