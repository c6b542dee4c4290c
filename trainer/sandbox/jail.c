/*
 * libsodkern-sandbox: the isolation of the fork server (forkserver.py), called through ctypes.
 *
 * sbx_split (once per server, i.e. per slot, before its modules are imported): new mount, network, IPC and
 * PID namespaces (plus a user namespace mapping the caller to root when it is not root).  The calling
 * process forks: it stays outside, waits for the server and exits with its status (it never returns); the
 * child, PID 1 of the new PID namespace, is the server from then on.
 *
 * sbx_server_setup (once per server, after its modules are imported): a new root file
 * system (a read-only tmpfs holding read-only, non-recursive bind mounts of the given paths only, a minimal
 * /dev (null, zero, full, random, urandom), mount points /tmp and /dev/shm), pivot_root into it and detach
 * the old root; its own /proc (hidepid=2: a snippet sees its own processes only, the server is not
 * dumpable); the slot's cgroups (memory, pids: every snippet is in them from its fork); the server's share
 * of the seccomp filter (isolation.c).  Nothing else of the host (other users' files, /root, /tmp, the
 * checkout, /sys, other processes, IPC objects) exists in it.
 *
 * sbx_serve (the server's loop, in C so that the server runs no Python between snippets and touches few of
 * its pages while a fork shares them): per request, a fresh size-limited tmpfs on /tmp (owned by the
 * snippet's user; its work dir lives there) and on /dev/shm (unless the last snippet left it empty), a fork
 * (libc's), and in the server the supervision (wall-clock limit, "kill" from the caller); when the snippet's
 * process has ended, every process left in the namespace is killed and reaped, then the reply goes out.  The
 * child sets up its std streams, enters its isolation (sbx_enter), writes main.py into the work dir and
 * returns into Python, which runs it.
 *
 * sbx_enter (in the child): a session of its own; rlimits; PR_SET_NO_NEW_PRIVS; Landlock (writes only to
 * /tmp, /dev/shm, /dev/null; reads only to the given paths); the user switch to the snippet's own uid (or,
 * without one, an empty capability set); PR_SET_PDEATHSIG; the snippet's share of the seccomp filter.
 * Errors print "sodkern-sandbox: ..." to fd 2 and _exit(126).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <linux/magic.h>
#include <poll.h>
#include <linux/capability.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "isolation.h"

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_close_range
#define SYS_close_range 436
#endif

#define ROOT "/tmp" /* where the new root is built before pivot_root (inside the private mount namespace) */

static int setup_error(const char *what) {
    fprintf(stderr, "sodkern-sandbox: %s: %s\n", what, strerror(errno));
    fflush(stderr);
    return -1;
}

static int write_file(const char *path, const char *text) {
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    ssize_t n = write(fd, text, strlen(text));
    int err = errno;
    close(fd);
    errno = err;
    return n == (ssize_t)strlen(text) ? 0 : -1;
}

/* mkdir -p of the directories leading to `path` (not `path` itself), mode 0755 */
static int make_parents(const char *path) {
    char buf[PATH_MAX];
    if (strlen(path) >= sizeof(buf)) return errno = ENAMETOOLONG, -1;
    strcpy(buf, path);
    for (char *p = buf + 1; *p; p++) {
        if (*p != '/') continue;
        *p = '\0';
        if (mkdir(buf, 0755) != 0 && errno != EEXIST) return -1;
        *p = '/';
    }
    return 0;
}

/* Bind `source` (opened as `fd`) read-only at ROOT + `path`; a symlink is recreated as a symlink. */
static int bind_readonly(const char *path, int fd, int devices) {
    char target[PATH_MAX], source[64], link[PATH_MAX];
    snprintf(target, sizeof(target), ROOT "%s", path);
    if (make_parents(target) != 0) return setup_error(target);
    struct stat st;
    if (fstatat(fd, "", &st, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) != 0) return setup_error(path);
    if (S_ISLNK(st.st_mode)) {
        ssize_t n = readlinkat(fd, "", link, sizeof(link) - 1);
        if (n < 0) return setup_error(path);
        link[n] = '\0';
        if (symlink(link, target) != 0 && errno != EEXIST) return setup_error(target);
        return 0;
    }
    if (S_ISDIR(st.st_mode)) {
        if (mkdir(target, 0755) != 0 && errno != EEXIST) return setup_error(target);
    } else {
        int made = open(target, O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
        if (made < 0) return setup_error(target);
        close(made);
    }
    snprintf(source, sizeof(source), "/proc/self/fd/%d", fd);
    if (mount(source, target, NULL, MS_BIND, NULL) != 0) return setup_error(path);
    unsigned long flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | (devices ? 0 : MS_NODEV);
    if (mount(NULL, target, NULL, flags, NULL) != 0) return setup_error(path);
    return 0;
}

static int map_user(unsigned uid, unsigned gid) {
    char map[64];
    if (write_file("/proc/self/setgroups", "deny") != 0 && errno != ENOENT) return setup_error("setgroups");
    snprintf(map, sizeof(map), "0 %u 1", uid);
    if (write_file("/proc/self/uid_map", map) != 0) return setup_error("uid_map");
    snprintf(map, sizeof(map), "0 %u 1", gid);
    if (write_file("/proc/self/gid_map", map) != 0) return setup_error("gid_map");
    return 0;
}

/* New mount, network, IPC and PID namespaces (and a user namespace where unprivileged); the calling process
 * splits in two: the caller waits for the server (the child, PID 1 of the new PID namespace) and exits with
 * its status, never returning; the child returns 0 with its pid as the parent namespace sees it in
 * *outer_pid.  Called before the server imports anything, so that the pages and mappings of the imports
 * are the server's own, not shared with the waiter (each fork's cost grows with that sharing). */
int sbx_split(int unprivileged, long long *outer_pid) {
    int flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWPID | (unprivileged ? CLONE_NEWUSER : 0);
    unsigned uid = getuid(), gid = getgid();
    if (unshare(flags) != 0) return setup_error("unshare(mount, net, IPC, PID namespaces)");
    if (unprivileged && map_user(uid, gid) != 0) return -1;
    int link[2];
    if (pipe2(link, O_CLOEXEC) != 0) return setup_error("pipe");
    pid_t pid = fork();
    if (pid < 0) return setup_error("fork");
    if (pid > 0) { /* the waiter: holds nothing (a socket kept open here would hide the server's exit) */
        if (write(link[1], &pid, sizeof(pid)) != (ssize_t)sizeof(pid)) _exit(126);
        syscall(SYS_close_range, 3U, ~0U, 0U);
        int status = 0;
        while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
        }
        _exit(WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status));
    }
    if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) != 0) return setup_error("prctl(PR_SET_PDEATHSIG)");
    close(link[1]);
    pid_t outer = 0;
    if (read(link[0], &outer, sizeof(outer)) != (ssize_t)sizeof(outer)) return setup_error("reading the pid");
    close(link[0]);
    *outer_pid = outer;
    return 0;
}

int sbx_server_setup(char **paths, int npath, int unprivileged, const int *cgroup_fds, int ncgroup) {
    static const char *devices[] = {"/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom"};
    enum { NDEV = sizeof(devices) / sizeof(devices[0]) };
    if (npath > MAX_PATHS) return errno = E2BIG, setup_error("too many read paths");
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) != 0) return setup_error("mount(/, MS_PRIVATE)");
    int fds[MAX_PATHS + NDEV];
    int n = 0;
    for (int i = 0; i < npath; i++) {
        fds[i] = open(paths[i], O_PATH | O_NOFOLLOW | O_CLOEXEC);
        if (fds[i] < 0 && errno != ENOENT) return setup_error(paths[i]);
    }
    for (int i = 0; i < NDEV; i++) fds[npath + i] = open(devices[i], O_PATH | O_CLOEXEC);
    n = npath + NDEV;
    if (mount("tmpfs", ROOT, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m,nr_inodes=4096") != 0)
        return setup_error("mount(new root tmpfs)");
    static const char *dirs[] = {ROOT "/dev", ROOT "/dev/shm", ROOT "/proc", ROOT "/tmp", ROOT "/.old"};
    for (size_t i = 0; i < sizeof(dirs) / sizeof(dirs[0]); i++)
        if (mkdir(dirs[i], 0755) != 0 && errno != EEXIST) return setup_error(dirs[i]);
    for (int i = 0; i < n; i++) {
        if (fds[i] < 0) continue;
        const char *path = i < npath ? paths[i] : devices[i - npath];
        if (bind_readonly(path, fds[i], i >= npath) != 0) return -1;
        close(fds[i]);
    }
    static const char *links[][2] = {{"/proc/self/fd", ROOT "/dev/fd"},
                                     {"/proc/self/fd/0", ROOT "/dev/stdin"},
                                     {"/proc/self/fd/1", ROOT "/dev/stdout"},
                                     {"/proc/self/fd/2", ROOT "/dev/stderr"}};
    for (size_t i = 0; i < sizeof(links) / sizeof(links[0]); i++)
        if (symlink(links[i][0], links[i][1]) != 0 && errno != EEXIST) return setup_error(links[i][1]);
    /* In a user namespace a new proc may only be mounted where a fully visible one exists: keep the host's
     * at /proc, under the server's own (which no snippet may unmount: no capability, seccomp). */
    if (unprivileged && mount("/proc", ROOT "/proc", NULL, MS_BIND | MS_REC, NULL) != 0)
        return setup_error("bind /proc");
    if (syscall(SYS_pivot_root, ROOT, ROOT "/.old") != 0) return setup_error("pivot_root");
    if (chdir("/") != 0) return setup_error("chdir(/)");
    if (umount2("/.old", MNT_DETACH) != 0) return setup_error("umount(old root)");
    if (rmdir("/.old") != 0) return setup_error("rmdir(/.old)");
    if (mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "hidepid=2") != 0)
        return setup_error("mount(/proc)");
    if (mount(NULL, "/", NULL, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, NULL) != 0)
        return setup_error("remount / read-only");
    if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0) return setup_error("prctl(PR_SET_DUMPABLE)");
    for (int i = 0; i < ncgroup; i++) {
        if (write(cgroup_fds[i], "0", 1) != 1) return setup_error("joining the slot's cgroup");
        close(cgroup_fds[i]);
    }
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) return setup_error("prctl(PR_SET_NO_NEW_PRIVS)");
    apply_seccomp(0, SBX_FILTER_SERVER);
    return 0;
}

struct sbx_limits {
    long long uid, gid;                            /* the snippet's own user; -1: stay (user namespace) */
    long long work_bytes, shm_bytes, inodes;       /* tmpfs sizes of /tmp and /dev/shm; inodes of /tmp */
    long long cpu, as, fsize, nproc, nofile;       /* rlimits; -1: unset */
};

static void set_limit(int resource, const char *name, long long value, long long hard) {
    if (value < 0) return;
    struct rlimit rl = {(rlim_t)value, (rlim_t)hard};
    if (setrlimit(resource, &rl) != 0) die(name);
}

static void drop_capabilities(void) {
    for (int cap = 0; prctl(PR_CAPBSET_READ, cap, 0, 0, 0) >= 0; cap++)
        if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0) die("prctl(PR_CAPBSET_DROP)");
    struct __user_cap_header_struct head = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2];
    memset(data, 0, sizeof(data));
    if (syscall(SYS_capset, &head, data) != 0) die("capset");
}

void sbx_enter(const struct sbx_limits *l, char **reads, int nread) {
    if (setsid() < 0) die("setsid");
    set_limit(RLIMIT_CORE, "RLIMIT_CORE", 0, 0);
    set_limit(RLIMIT_CPU, "RLIMIT_CPU", l->cpu, l->cpu + 1);
    set_limit(RLIMIT_AS, "RLIMIT_AS", l->as, l->as);
    set_limit(RLIMIT_FSIZE, "RLIMIT_FSIZE", l->fsize, l->fsize);
    set_limit(RLIMIT_NPROC, "RLIMIT_NPROC", l->nproc, l->nproc);
    set_limit(RLIMIT_NOFILE, "RLIMIT_NOFILE", l->nofile, l->nofile);
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) die("prctl(PR_SET_NO_NEW_PRIVS)");
    char *writes[] = {"/tmp", "/dev/shm", "/dev/null"};
    apply_landlock(writes, 3, reads, nread);
    if (l->uid >= 0) {
        if (setgroups(0, NULL) != 0) die("setgroups");
        if (setresgid((gid_t)l->gid, (gid_t)l->gid, (gid_t)l->gid) != 0) die("setresgid");
        if (setresuid((uid_t)l->uid, (uid_t)l->uid, (uid_t)l->uid) != 0) die("setresuid");
        if (setuid(0) == 0 || seteuid(0) == 0) {
            fprintf(stderr, "sodkern-sandbox: could regain root after dropping it\n");
            _exit(126);
        }
    } else {
        drop_capabilities();
    }
    if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) != 0) die("prctl(PR_SET_PDEATHSIG)");
    apply_seccomp(0, SBX_FILTER_SNIPPET);
}

#define WORKDIR "/tmp/sodkern-sbx" /* the snippet's work dir, on its own tmpfs (forkserver.py, server.py) */

/* One request: "run" with descriptors [code, stdout, stderr(, stdin)]; returns the message length (0: end of
 * file), the descriptors in fds[0..*nfd). */
static ssize_t receive(int sock, char *msg, size_t len, int fds[4], int *nfd) {
    char control[CMSG_SPACE(4 * sizeof(int))];
    struct iovec iov = {msg, len};
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control, .msg_controllen = sizeof(control)};
    ssize_t n;
    do n = recvmsg(sock, &mh, MSG_CMSG_CLOEXEC);
    while (n < 0 && errno == EINTR);
    *nfd = 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c))
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
            int k = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
            for (int i = 0; i < k && *nfd < 4; i++) memcpy(&fds[(*nfd)++], CMSG_DATA(c) + i * sizeof(int), sizeof(int));
        }
    return n;
}

static void close_all(int *fds, int n) {
    for (int i = 0; i < n; i++) close(fds[i]);
}

static void reply_error(int sock, const char *what) {
    char text[256];
    snprintf(text, sizeof(text), "{\"error\": \"%s: %s\"}", what, strerror(errno));
    send(sock, text, strlen(text), MSG_NOSIGNAL);
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* The child of a request: std streams, isolation, main.py in the work dir; never fails back (die). */
static void enter_child(int *fds, int nfd, const struct sbx_limits *l, char **reads, int nread) {
    prctl(PR_SET_NAME, "sodkern-snippet", 0, 0, 0);
    int in = nfd > 3 ? fds[3] : open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (in < 0 || dup2(in, 0) < 0 || dup2(fds[1], 1) < 0 || dup2(fds[2], 2) < 0) die("std streams");
    struct stat st;
    if (fstat(fds[0], &st) != 0) die("code");
    char *code = malloc((size_t)st.st_size + 1);
    if (code == NULL) die("code");
    off_t got = 0;
    while (got < st.st_size) {
        ssize_t n = pread(fds[0], code + got, (size_t)(st.st_size - got), got);
        if (n <= 0) die("reading the code");
        got += n;
    }
    sbx_enter(l, reads, nread);
    syscall(SYS_close_range, 3U, ~0U, 0U);
    if (mkdir(WORKDIR, 0700) != 0 || chdir(WORKDIR) != 0) die(WORKDIR);
    int fd = open("main.py", O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0) die("main.py");
    for (off_t done = 0; done < got;) {
        ssize_t n = write(fd, code + done, (size_t)(got - done));
        if (n <= 0) die("main.py");
        done += n;
    }
    close(fd);
    free(code);
}

/* Every process of the namespace but the server (PID 1), i.e. whatever the snippet left running: killed and
 * reaped (orphans are re-parented to PID 1, so "no child left" means none left). */
static void kill_leftovers(void) {
    if (waitpid(-1, NULL, WNOHANG | __WALL) < 0 && errno == ECHILD) return; /* the usual case: none */
    for (;;) {
        kill(-1, SIGKILL);
        if (waitpid(-1, NULL, __WALL) < 0 && errno == ECHILD) return;
    }
}

/* Wait for the snippet's process until it exits, the wall-clock limit passes or the caller says "kill";
 * kill what is left; reply its wait status, CPU time and why it was stopped.  Returns 0, or -1 when the
 * caller is gone. */
static int supervise(int sock, pid_t pid, double timeout) {
    int pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
    const char *reason = NULL;
    int gone = 0;
    double deadline = now() + timeout;
    while (pidfd >= 0) {
        double remaining = deadline - now();
        if (remaining <= 0) {
            reason = "\"timeout\"";
            break;
        }
        struct pollfd p[2] = {{pidfd, POLLIN, 0}, {sock, POLLIN, 0}};
        int r = poll(p, 2, (int)(remaining * 1000) + 1);
        if (r < 0 && errno != EINTR) break;
        if (r <= 0) continue;
        if (p[0].revents) break;
        char data[64];
        ssize_t n = recv(sock, data, sizeof(data), MSG_DONTWAIT);
        if (n < 0 && errno == EAGAIN) continue;
        reason = "\"killed\"";
        gone = n <= 0;
        break;
    }
    if (pidfd >= 0) close(pidfd);
    if (reason != NULL || pidfd < 0) kill(pid, SIGKILL);
    int status = 0;
    struct rusage ru;
    memset(&ru, 0, sizeof(ru));
    while (wait4(pid, &status, 0, &ru) < 0 && errno == EINTR) {
    }
    kill_leftovers();
    if (gone) return -1;
    double cpu = (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
                 1e-6 * (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec);
    char text[160];
    snprintf(text, sizeof(text), "{\"status\": %d, \"cpu\": %.6f, \"reason\": %s}", status, cpu,
             reason ? reason : "null");
    send(sock, text, strlen(text), MSG_NOSIGNAL);
    return 0;
}

/* A new, empty tmpfs on `path` in place of the last snippet's (nothing of it is seen again). */
static int fresh_tmpfs(const char *path, unsigned long flags, const char *options) {
    if (umount2(path, MNT_DETACH) != 0 && errno != EINVAL) return -1; /* EINVAL: none mounted yet */
    return mount("tmpfs", path, "tmpfs", flags, options);
}

/* Whether the tmpfs on `path` holds nothing but its root directory (owned by root, mode 1777: a snippet
 * cannot change it), i.e. the last snippet left nothing there: most never touch /dev/shm. */
static int tmpfs_empty(const char *path) {
    struct statfs fs;
    return statfs(path, &fs) == 0 && fs.f_type == TMPFS_MAGIC && fs.f_files - fs.f_ffree <= 1;
}

int sbx_serve(int sock, double timeout, const struct sbx_limits *l, char **reads, int nread) {
    if (getpid() != 1) { /* kill(-1) below must only ever reach the server's own namespace */
        fprintf(stderr, "sodkern-sandbox: sbx_serve outside the server's PID namespace\n");
        return -1;
    }
    char work[160], shm[96];
    long long owner = l->uid >= 0 ? l->uid : 0, group = l->gid >= 0 ? l->gid : 0;
    snprintf(work, sizeof(work), "mode=0700,uid=%lld,gid=%lld,size=%lld,nr_inodes=%lld", owner, group,
             l->work_bytes, l->inodes);
    snprintf(shm, sizeof(shm), "mode=1777,size=%lld,nr_inodes=1024", l->shm_bytes);
    for (;;) {
        char msg[64];
        int fds[4], nfd;
        ssize_t n = receive(sock, msg, sizeof(msg), fds, &nfd);
        if (n <= 0) {
            close_all(fds, nfd);
            return 0; /* end of file: the caller closed the server */
        }
        if (n == 4 && memcmp(msg, "kill", 4) == 0) { /* came after the snippet it was meant for had ended */
            close_all(fds, nfd);
            continue;
        }
        if (nfd < 3) {
            errno = EINVAL;
            reply_error(sock, "request without its descriptors");
            close_all(fds, nfd);
            continue;
        }
        if (fresh_tmpfs("/tmp", MS_NOSUID | MS_NODEV, work) != 0 ||
            (!tmpfs_empty("/dev/shm") && fresh_tmpfs("/dev/shm", MS_NOSUID | MS_NODEV | MS_NOEXEC, shm) != 0)) {
            reply_error(sock, "mount(tmpfs)");
            close_all(fds, nfd);
            continue;
        }
        pid_t pid = fork();
        if (pid == 0) {
            enter_child(fds, nfd, l, reads, nread);
            return 1;
        }
        int err = errno;
        close_all(fds, nfd);
        if (pid < 0) {
            errno = err;
            reply_error(sock, "fork");
            continue;
        }
        if (supervise(sock, pid, timeout) != 0) return 0;
    }
}
