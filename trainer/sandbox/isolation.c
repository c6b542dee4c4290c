/*
 * Isolation steps of the sodkern-sandbox launcher (see launcher.c for the order they run in).
 *
 * Landlock (unprivileged, ABI read at run time; the UAPI values are spelled out because system headers may
 * predate the running kernel): writes only below the --write paths, reads only below the --read paths, no
 * TCP bind/connect (ABI >= 4), no signals or abstract unix sockets to processes outside (ABI >= 6).
 *
 * Seccomp (raw BPF, no libseccomp): the architecture is checked against AUDIT_ARCH (x86-64 or aarch64;
 * any other ABI, e.g. i386 int 0x80 or x32, kills the process); socket() fails with EPERM for every
 * family (no network, no abstract or path unix sockets), socketpair() is allowed for AF_UNIX only;
 * ptrace, process_vm_*, io_uring (it can open sockets behind seccomp's back), bpf, perf_event_open,
 * userfaultfd, the key rings, namespaces, mounts, module loading, setsid/setpgid (the supervisor kills the
 * whole process group) and the TIOCSTI/TIOCLINUX ioctls fail with EPERM; clone() with namespace flags
 * fails with EPERM and clone3() with ENOSYS (libc falls back to clone()).  With restrict_signals (no user
 * switch and no Landlock signal scoping), kill/tkill/tgkill/rt_(tg)sigqueueinfo may only target the
 * program itself or its own process group, and pidfd_send_signal fails.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sched.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "isolation.h"

#if defined(__x86_64__)
#define SBX_AUDIT_ARCH AUDIT_ARCH_X86_64
#elif defined(__aarch64__)
#define SBX_AUDIT_ARCH AUDIT_ARCH_AARCH64
#else
#error "sodkern-sandbox supports x86-64 and aarch64 only"
#endif

#ifndef SECCOMP_RET_KILL_PROCESS
#define SECCOMP_RET_KILL_PROCESS SECCOMP_RET_KILL
#endif
#ifndef CLONE_NEWCGROUP
#define CLONE_NEWCGROUP 0x02000000
#endif
#ifndef CLONE_NEWTIME
#define CLONE_NEWTIME 0x00000080
#endif

/* Landlock: the system headers may predate the ABI the kernel offers, so the (stable) UAPI values are
 * spelled out here.  Syscall numbers come from the headers when they have them (same on both archs). */
#ifndef __NR_landlock_create_ruleset
#define __NR_landlock_create_ruleset 444
#define __NR_landlock_add_rule 445
#define __NR_landlock_restrict_self 446
#endif
#define LL_CREATE_RULESET_VERSION (1U << 0)
#define LL_RULE_PATH_BENEATH 1
#define LL_FS_EXECUTE (1ULL << 0)
#define LL_FS_WRITE_FILE (1ULL << 1)
#define LL_FS_READ_FILE (1ULL << 2)
#define LL_FS_READ_DIR (1ULL << 3)
#define LL_FS_REMOVE_DIR (1ULL << 4)
#define LL_FS_REMOVE_FILE (1ULL << 5)
#define LL_FS_MAKE_CHAR (1ULL << 6)
#define LL_FS_MAKE_DIR (1ULL << 7)
#define LL_FS_MAKE_REG (1ULL << 8)
#define LL_FS_MAKE_SOCK (1ULL << 9)
#define LL_FS_MAKE_FIFO (1ULL << 10)
#define LL_FS_MAKE_BLOCK (1ULL << 11)
#define LL_FS_MAKE_SYM (1ULL << 12)
#define LL_FS_REFER (1ULL << 13)    /* ABI 2 */
#define LL_FS_TRUNCATE (1ULL << 14) /* ABI 3 */
#define LL_NET_BIND_TCP (1ULL << 0) /* ABI 4 */
#define LL_NET_CONNECT_TCP (1ULL << 1)
#define LL_SCOPE_ABSTRACT_UNIX (1ULL << 0) /* ABI 6 */
#define LL_SCOPE_SIGNAL (1ULL << 1)
#define LL_FILE_RIGHTS (LL_FS_EXECUTE | LL_FS_WRITE_FILE | LL_FS_READ_FILE | LL_FS_TRUNCATE)

struct ll_ruleset_attr {
    uint64_t handled_access_fs;
    uint64_t handled_access_net;
    uint64_t scoped;
};
struct ll_path_beneath_attr {
    uint64_t allowed_access;
    int32_t parent_fd;
} __attribute__((packed));

void die(const char *what) {
    fprintf(stderr, "sodkern-sandbox: %s: %s\n", what, strerror(errno));
    fflush(stderr);
    _exit(126);
}

int landlock_abi(void) {
    long abi = syscall(__NR_landlock_create_ruleset, NULL, 0, LL_CREATE_RULESET_VERSION);
    return abi < 0 ? 0 : (int)abi;
}

static void landlock_rule(int ruleset, const char *path, uint64_t access) {
    int fd = open(path, O_PATH | O_CLOEXEC);
    if (fd < 0) {
        if (errno == ENOENT) return; /* an optional system directory (e.g. /lib32) that is not there */
        die(path);
    }
    struct stat st;
    if (fstat(fd, &st) != 0) die(path);
    struct ll_path_beneath_attr rule = {S_ISDIR(st.st_mode) ? access : (access & LL_FILE_RIGHTS), fd};
    if (rule.allowed_access && syscall(__NR_landlock_add_rule, ruleset, LL_RULE_PATH_BENEATH, &rule, 0) != 0)
        die(path);
    close(fd);
}

/* Returns the Landlock ABI that was applied (0: not available, nothing restricted). */
int apply_landlock(char **writes, int nwrite, char **reads, int nread) {
    int abi = landlock_abi();
    if (abi <= 0) return 0;
    uint64_t write = LL_FS_WRITE_FILE | LL_FS_REMOVE_DIR | LL_FS_REMOVE_FILE | LL_FS_MAKE_CHAR | LL_FS_MAKE_DIR |
                     LL_FS_MAKE_REG | LL_FS_MAKE_SOCK | LL_FS_MAKE_FIFO | LL_FS_MAKE_BLOCK | LL_FS_MAKE_SYM;
    if (abi >= 2) write |= LL_FS_REFER;
    if (abi >= 3) write |= LL_FS_TRUNCATE;
    uint64_t read = nread > 0 ? (LL_FS_READ_FILE | LL_FS_READ_DIR) : 0;
    struct ll_ruleset_attr attr = {write | read, 0, 0};
    size_t size = sizeof(uint64_t);
    if (abi >= 4) {
        attr.handled_access_net = LL_NET_BIND_TCP | LL_NET_CONNECT_TCP; /* no rule: no TCP at all */
        size = 2 * sizeof(uint64_t);
    }
    if (abi >= 6) {
        attr.scoped = LL_SCOPE_ABSTRACT_UNIX | LL_SCOPE_SIGNAL; /* no signals to processes outside */
        size = sizeof(attr);
    }
    int ruleset = (int)syscall(__NR_landlock_create_ruleset, &attr, size, 0);
    if (ruleset < 0) die("landlock_create_ruleset");
    for (int i = 0; i < nwrite; i++) landlock_rule(ruleset, writes[i], write | read);
    for (int i = 0; i < nread; i++) landlock_rule(ruleset, reads[i], read);
    if (syscall(__NR_landlock_restrict_self, ruleset, 0) != 0) die("landlock_restrict_self");
    close(ruleset);
    return abi;
}

/* ---- seccomp ------------------------------------------------------------------------------------- */

#define MAX_FILTER 256
static struct sock_filter filter[MAX_FILTER];
static unsigned short nfilter;

#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define ARG_LO(i) (offsetof(struct seccomp_data, args) + 8 * (i))
#else
#define ARG_LO(i) (offsetof(struct seccomp_data, args) + 8 * (i) + 4)
#endif
/* compound literals, so that each instruction can be passed to emit() */
#define STMT(code, k) ((struct sock_filter)BPF_STMT((code), (k)))
#define JUMP(code, k, jt, jf) ((struct sock_filter)BPF_JUMP((code), (k), (jt), (jf)))
#define RET_ERRNO(e) STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | ((e) & SECCOMP_RET_DATA))
#define RET_ALLOW STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW)
#define RET_KILL STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS)
#define LOAD(off) STMT(BPF_LD | BPF_W | BPF_ABS, (off))
#define JEQ(k, jt, jf) JUMP(BPF_JMP | BPF_JEQ | BPF_K, (k), (jt), (jf))

static void emit(struct sock_filter f) {
    if (nfilter >= MAX_FILTER) {
        fprintf(stderr, "sodkern-sandbox: seccomp filter too long\n");
        exit(126);
    }
    filter[nfilter++] = f;
}

/* Syscall nr fails with errno err.  The accumulator holds nr before and after. */
static void deny(int nr, int err) {
    emit(JEQ((uint32_t)nr, 0, 1));
    emit(RET_ERRNO(err));
}

/* Syscall nr is allowed when the low word of argument `arg` equals k, else fails with err. */
static void allow_arg_eq(int nr, int arg, uint32_t k, int err) {
    emit(JEQ((uint32_t)nr, 0, 4));
    emit(LOAD(ARG_LO(arg)));
    emit(JEQ(k, 0, 1));
    emit(RET_ALLOW);
    emit(RET_ERRNO(err));
}

/* Syscall nr fails with err when (low word of argument `arg`) & mask != 0. */
static void deny_arg_bits(int nr, int arg, uint32_t mask, int err) {
    emit(JEQ((uint32_t)nr, 0, 4));
    emit(LOAD(ARG_LO(arg)));
    emit(JUMP(BPF_JMP | BPF_JSET | BPF_K, mask, 0, 1));
    emit(RET_ERRNO(err));
    emit(RET_ALLOW);
}

/* Signal-sending syscall nr may only target pid/tgid `self` (and, when `group`, 0 or -self). */
static void signal_only_self(int nr, uint32_t self, int group) {
    emit(JEQ((uint32_t)nr, 0, 6));
    emit(LOAD(ARG_LO(0)));
    emit(JEQ(self, 3, 0));
    emit(JEQ(group ? 0u : self, 2, 0));
    emit(JEQ(group ? (uint32_t)(-(int32_t)self) : self, 1, 0));
    emit(RET_ERRNO(EPERM));
    emit(RET_ALLOW);
}

/* The calls a fork server itself still needs for each snippet (fresh tmpfs mounts; the snippet's session):
 * the server's filter allows them, each snippet's own small filter denies them. */
static const int server_needs[] = {__NR_mount, __NR_umount2, __NR_setsid};

void apply_seccomp(int restrict_signals, int part) {
    nfilter = 0; /* a fork server's child installs its own after the server's */
    emit(LOAD(offsetof(struct seccomp_data, arch)));
    emit(JEQ(SBX_AUDIT_ARCH, 1, 0));
    emit(RET_KILL);
    emit(LOAD(offsetof(struct seccomp_data, nr)));
#if defined(__x86_64__)
    emit(JUMP(BPF_JMP | BPF_JGE | BPF_K, 0x40000000u /* __X32_SYSCALL_BIT */, 0, 1));
    emit(RET_KILL);
#endif
    if (part == SBX_FILTER_SNIPPET) {
        for (size_t i = 0; i < sizeof(server_needs) / sizeof(server_needs[0]); i++) deny(server_needs[i], EPERM);
        /* limits, priority and scheduling of the process itself only (pid 0): never of the server, whose
         * user a snippet shares in a user namespace */
        static const int self_only[][2] = {{__NR_prlimit64, 0}, {__NR_setpriority, 1}, {__NR_ioprio_set, 1},
                                           {__NR_sched_setaffinity, 0}, {__NR_sched_setscheduler, 0},
                                           {__NR_sched_setparam, 0}, {__NR_sched_setattr, 0}};
        for (size_t i = 0; i < sizeof(self_only) / sizeof(self_only[0]); i++)
            allow_arg_eq(self_only[i][0], self_only[i][1], 0, EPERM);
        emit(RET_ALLOW);
        struct sock_fprog prog = {nfilter, filter};
        if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) != 0) die("prctl(PR_SET_SECCOMP)");
        return;
    }
    if (part == SBX_FILTER_ALL)
        for (size_t i = 0; i < sizeof(server_needs) / sizeof(server_needs[0]); i++) deny(server_needs[i], EPERM);
    deny(__NR_socket, EPERM);
    allow_arg_eq(__NR_socketpair, 0, AF_UNIX, EPERM);
    static const int denied[] = {
        __NR_ptrace, __NR_process_vm_readv, __NR_process_vm_writev, __NR_bpf, __NR_perf_event_open,
        __NR_userfaultfd, __NR_keyctl, __NR_add_key, __NR_request_key, __NR_unshare, __NR_setns,
        __NR_pivot_root, __NR_chroot, __NR_setpgid, __NR_kexec_load,
        __NR_init_module, __NR_finit_module, __NR_delete_module, __NR_reboot, __NR_swapon, __NR_swapoff,
        __NR_acct, __NR_open_by_handle_at,
#ifdef __NR_io_uring_setup
        __NR_io_uring_setup, __NR_io_uring_enter, __NR_io_uring_register,
#endif
#ifdef __NR_open_tree
        __NR_open_tree, __NR_move_mount, __NR_fsopen, __NR_fsconfig, __NR_fsmount, __NR_fspick,
#endif
    };
    for (size_t i = 0; i < sizeof(denied) / sizeof(denied[0]); i++) deny(denied[i], EPERM);
    if (part == SBX_FILTER_SERVER) { /* System V and POSIX message-queue IPC: nothing a snippet could leave */
        static const int ipc[] = {
            __NR_shmget, __NR_shmat, __NR_shmctl, __NR_shmdt, __NR_semget, __NR_semop, __NR_semctl,
            __NR_semtimedop, __NR_msgget, __NR_msgsnd, __NR_msgrcv, __NR_msgctl, __NR_mq_open, __NR_mq_unlink,
            __NR_mq_timedsend, __NR_mq_timedreceive, __NR_mq_notify, __NR_mq_getsetattr,
        };
        for (size_t i = 0; i < sizeof(ipc) / sizeof(ipc[0]); i++) deny(ipc[i], EPERM);
    }
#ifdef __NR_clone3
    deny(__NR_clone3, ENOSYS);
#endif
    /* the first clone() argument is the flags word on both x86-64 and aarch64 */
    deny_arg_bits(__NR_clone, 0,
                  CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID |
                      CLONE_NEWNET | CLONE_NEWTIME,
                  EPERM);
    /* ioctl(fd, TIOCSTI/TIOCLINUX): no typing into a terminal the program might still reach */
    emit(JEQ(__NR_ioctl, 0, 5));
    emit(LOAD(ARG_LO(1)));
    emit(JEQ(TIOCSTI, 1, 0));
    emit(JEQ(TIOCLINUX, 0, 1));
    emit(RET_ERRNO(EPERM));
    emit(RET_ALLOW);
    if (restrict_signals) {
        uint32_t self = (uint32_t)getpid(); /* the pid survives execv; it is also the process-group id */
        signal_only_self(__NR_kill, self, 1);
        signal_only_self(__NR_tkill, self, 0);
        signal_only_self(__NR_tgkill, self, 0);
        signal_only_self(__NR_rt_sigqueueinfo, self, 0);
        signal_only_self(__NR_rt_tgsigqueueinfo, self, 0);
#ifdef __NR_pidfd_send_signal
        deny(__NR_pidfd_send_signal, EPERM);
#endif
    }
    emit(RET_ALLOW);
    struct sock_fprog prog = {nfilter, filter};
    if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) != 0) die("prctl(PR_SET_SECCOMP)");
}

int seccomp_works(void) {
    struct sock_filter allow[] = {RET_ALLOW};
    struct sock_fprog prog = {1, allow};
    return prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) == 0;
}

/* ---- reaching an interpreter installed below a directory the sandbox user cannot search ---------------- */

/* In a private mount namespace, make each directory in `paths` reachable at its own path: the first
 * ancestor that others cannot search (e.g. a 0700 /root) is covered by an empty tmpfs (mode 0755; the rest
 * of it stays hidden), the path down to the directory is recreated there, and the directory itself is
 * bind-mounted back from a descriptor opened before.  Needs CAP_SYS_ADMIN; the caller probes first. */
void expose_paths(char **paths, int n) {
    if (n == 0) return;
    if (unshare(CLONE_NEWNS) != 0) die("unshare(CLONE_NEWNS)");
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) != 0) die("mount(/, MS_PRIVATE)");
    int fds[MAX_PATHS]; /* opened in the new namespace (a bind source must be in it) and before any cover */
    for (int i = 0; i < n; i++)
        if ((fds[i] = open(paths[i], O_PATH | O_DIRECTORY | O_CLOEXEC)) < 0) die(paths[i]);
    char covered[MAX_PATHS][PATH_MAX]; /* the tmpfs mount points made so far */
    int ncovered = 0;
    for (int i = 0; i < n; i++) {
        char part[PATH_MAX];
        size_t len = strlen(paths[i]);
        if (paths[i][0] != '/' || len >= sizeof(part)) {
            errno = EINVAL;
            die(paths[i]);
        }
        int rebuilt = 0; /* below a tmpfs of ours: missing directories are created, the target bound back */
        for (size_t end = 1; end <= len; end++) {
            if (end < len && paths[i][end] != '/') continue;
            memcpy(part, paths[i], end);
            part[end] = '\0';
            for (int c = 0; c < ncovered; c++) rebuilt |= strcmp(part, covered[c]) == 0;
            struct stat st;
            if (stat(part, &st) != 0) {
                if (errno != ENOENT || !rebuilt) die(part);
                if (mkdir(part, 0755) != 0) die(part);
            } else if (!rebuilt && end < len && S_ISDIR(st.st_mode) && !(st.st_mode & S_IXOTH)) {
                if (mount("tmpfs", part, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=0755,size=1m") != 0)
                    die(part);
                memcpy(covered[ncovered++], part, end + 1);
                rebuilt = 1;
            }
        }
        if (rebuilt) {
            char source[64];
            snprintf(source, sizeof(source), "/proc/self/fd/%d", fds[i]);
            if (mount(source, paths[i], NULL, MS_BIND | MS_REC, NULL) != 0) die(paths[i]);
        }
        close(fds[i]);
    }
}

int can_unshare_mounts(void) {
    pid_t pid = fork();
    if (pid == 0) _exit(unshare(CLONE_NEWNS) == 0 && mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) == 0 ? 0 : 1);
    int status;
    return pid > 0 && waitpid(pid, &status, 0) == pid && WIFEXITED(status) && WEXITSTATUS(status) == 0;
}
