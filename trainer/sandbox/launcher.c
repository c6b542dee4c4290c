/*
 * sodkern-sandbox: start one untrusted program under resource limits, an unprivileged user, Landlock and a
 * seccomp filter.  Built by the top-level CMakeLists.txt; driven by sodkern/trainer/sandbox/local.py.
 *
 *   sodkern-sandbox [OPTIONS] -- PROGRAM [ARG...]
 *
 *   --cpu S        RLIMIT_CPU soft limit in seconds (SIGXCPU), hard limit S + 1 (SIGKILL)
 *   --memory B     RLIMIT_AS in bytes
 *   --fsize B      RLIMIT_FSIZE in bytes
 *   --nproc N      RLIMIT_NPROC (counted per real user id)
 *   --nofile N     RLIMIT_NOFILE
 *   --uid U        switch to this user id (the caller must be root); needs --gid
 *   --gid G        switch to this group id; supplementary groups are dropped
 *   --ppid P       the caller's pid: exit at once if it is already gone (PR_SET_PDEATHSIG covers later)
 *   --write PATH   Landlock: PATH (a tree or a file) stays writable; nothing else is   (repeatable)
 *   --read PATH    Landlock: PATH stays readable; when given, nothing else is          (repeatable)
 *   --expose DIR   make DIR reachable at its own path although an ancestor is not searchable by the
 *                  sandbox user (private mount namespace; see expose_paths)            (repeatable)
 *   --probe        print the available kernel features ("seccomp=1 landlock=N mountns=1") and exit
 *
 * The launcher stays as a small supervisor (PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER) and forks the child
 * that runs PROGRAM in a process group of its own.  The supervisor reaps every process of that tree (zombies
 * would count against the sandbox user's RLIMIT_NPROC when nothing else reaps them, e.g. a trainer running
 * as PID 1 in a container), answers SIGTERM by killing the child's group with SIGKILL, kills the group once
 * the child exits, and then exits the way the child did (re-raising its signal).
 *
 * The child's steps, each needing the previous: setpgid -> rlimits -> --expose (mount namespace; before
 * Landlock, which forbids mounting) -> PR_SET_NO_NEW_PRIVS -> Landlock (its rules open the paths while
 * still root, so an exposed prefix stays readable) -> setgroups/setresgid/setresuid, or, as root without
 * --uid, an empty capability bounding set -> PR_SET_PDEATHSIG (cleared by any credential change, so it
 * comes after) -> seccomp -> execv.  The isolation steps themselves are in isolation.c.
 *
 * The environment and file descriptors are passed through: the caller hands over a stripped environment
 * and closes every other descriptor.  Setup errors print "sodkern-sandbox: ..." and exit 126 (127 when
 * PROGRAM cannot be executed).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <grp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include "isolation.h"

static void usage(const char *msg) {
    fprintf(stderr, "sodkern-sandbox: %s\nusage: sodkern-sandbox [--cpu S] [--memory B] [--fsize B] [--nproc N] "
                    "[--nofile N] [--uid U --gid G] [--ppid P] [--write PATH]... [--read PATH]... [--expose DIR]... "
                    "-- PROGRAM [ARG...]\n       sodkern-sandbox --probe\n",
            msg);
    exit(126);
}

static unsigned long long parse_num(const char *opt, const char *s) {
    char *end = NULL;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || end == s || *end != '\0' || s[0] == '-') {
        fprintf(stderr, "sodkern-sandbox: %s expects a non-negative integer, got '%s'\n", opt, s);
        exit(126);
    }
    return v;
}

static void set_limit(int resource, const char *name, rlim_t soft, rlim_t hard) {
    struct rlimit rl = {soft, hard};
    if (setrlimit(resource, &rl) != 0) die(name);
}

static int probe(void) {
    int abi = landlock_abi();
    int mountns = can_unshare_mounts();
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) die("prctl(PR_SET_NO_NEW_PRIVS)");
    printf("seccomp=%d landlock=%d mountns=%d\n", seccomp_works(), abi, mountns);
    return 0;
}

struct options {
    long long cpu, memory, fsize, nproc, nofile, uid, gid;
    char *writes[MAX_PATHS], *reads[MAX_PATHS], *exposes[MAX_PATHS];
    int nwrite, nread, nexpose;
};

/* The sandboxed child: its own process group, limits, Landlock, user switch, seccomp, then the program. */
static void run_child(const struct options *o, pid_t supervisor, char **program) {
    if (setpgid(0, 0) != 0) die("setpgid");
    set_limit(RLIMIT_CORE, "RLIMIT_CORE", 0, 0);
    if (o->cpu >= 0) set_limit(RLIMIT_CPU, "RLIMIT_CPU", (rlim_t)o->cpu, (rlim_t)o->cpu + 1);
    if (o->memory >= 0) set_limit(RLIMIT_AS, "RLIMIT_AS", (rlim_t)o->memory, (rlim_t)o->memory);
    if (o->fsize >= 0) set_limit(RLIMIT_FSIZE, "RLIMIT_FSIZE", (rlim_t)o->fsize, (rlim_t)o->fsize);
    if (o->nproc >= 0) set_limit(RLIMIT_NPROC, "RLIMIT_NPROC", (rlim_t)o->nproc, (rlim_t)o->nproc);
    if (o->nofile >= 0) set_limit(RLIMIT_NOFILE, "RLIMIT_NOFILE", (rlim_t)o->nofile, (rlim_t)o->nofile);
    expose_paths((char **)o->exposes, o->nexpose);

    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) die("prctl(PR_SET_NO_NEW_PRIVS)");
    int abi = apply_landlock((char **)o->writes, o->nwrite, (char **)o->reads, o->nread);

    if (o->uid < 0 && geteuid() == 0) {
        /* staying root: empty the bounding set, so that the root exec below gains no capabilities */
        for (int cap = 0; prctl(PR_CAPBSET_READ, cap, 0, 0, 0) >= 0; cap++)
            if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0) die("prctl(PR_CAPBSET_DROP)");
    }
    if (o->uid >= 0) {
        if (setgroups(0, NULL) != 0) die("setgroups");
        if (setresgid((gid_t)o->gid, (gid_t)o->gid, (gid_t)o->gid) != 0) die("setresgid");
        if (setresuid((uid_t)o->uid, (uid_t)o->uid, (uid_t)o->uid) != 0) die("setresuid");
        if (o->uid != 0 && (setuid(0) == 0 || seteuid(0) == 0)) {
            fprintf(stderr, "sodkern-sandbox: could regain root after dropping it\n");
            _exit(126);
        }
    }
    if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) != 0) die("prctl(PR_SET_PDEATHSIG)");
    if (getppid() != supervisor) _exit(126); /* the supervisor died before PDEATHSIG was armed */

    apply_seccomp(o->uid < 0 && abi < 6, SBX_FILTER_ALL);
    execv(program[0], program);
    int err = errno;
    fprintf(stderr, "sodkern-sandbox: exec %s: %s\n", program[0], strerror(err));
    _exit(err == ENOENT || err == EACCES ? 127 : 126);
}

static volatile pid_t child_group = -1;

static void kill_child_group(int sig) {
    (void)sig;
    if (child_group > 0) kill(-child_group, SIGKILL);
}

int main(int argc, char **argv) {
    struct options o = {-1, -1, -1, -1, -1, -1, -1, {0}, {0}, {0}, 0, 0, 0};
    long long ppid = -1;
    int i = 1;
    for (; i < argc; i++) {
        const char *opt = argv[i];
        if (strcmp(opt, "--") == 0) {
            i++;
            break;
        }
        if (strcmp(opt, "--probe") == 0) return probe();
        if (i + 1 >= argc) usage("missing value");
        char *val = argv[++i];
        char **list = strcmp(opt, "--write") == 0    ? o.writes
                      : strcmp(opt, "--read") == 0   ? o.reads
                      : strcmp(opt, "--expose") == 0 ? o.exposes
                                                     : NULL;
        if (list) {
            int *count = list == o.writes ? &o.nwrite : list == o.reads ? &o.nread : &o.nexpose;
            if (*count >= MAX_PATHS) usage("too many paths");
            list[(*count)++] = val;
            continue;
        }
        long long v = (long long)parse_num(opt, val);
        if (strcmp(opt, "--cpu") == 0) o.cpu = v;
        else if (strcmp(opt, "--memory") == 0) o.memory = v;
        else if (strcmp(opt, "--fsize") == 0) o.fsize = v;
        else if (strcmp(opt, "--nproc") == 0) o.nproc = v;
        else if (strcmp(opt, "--nofile") == 0) o.nofile = v;
        else if (strcmp(opt, "--uid") == 0) o.uid = v;
        else if (strcmp(opt, "--gid") == 0) o.gid = v;
        else if (strcmp(opt, "--ppid") == 0) ppid = v;
        else usage("unknown option");
    }
    if (i >= argc) usage("no PROGRAM given");
    if ((o.uid < 0) != (o.gid < 0)) usage("--uid and --gid go together");

    /* the supervisor (see the top of this file) */
    if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) != 0) die("prctl(PR_SET_PDEATHSIG)");
    if (ppid >= 0 && getppid() != (pid_t)ppid) return 126; /* the caller is gone already */
    if (prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0) die("prctl(PR_SET_CHILD_SUBREAPER)");
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = kill_child_group;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGTERM, &sa, NULL) != 0) die("sigaction");
    sigset_t term, old;
    sigemptyset(&term);
    sigaddset(&term, SIGTERM);
    sigprocmask(SIG_BLOCK, &term, &old); /* no SIGTERM until child_group is known */
    pid_t supervisor = getpid();
    pid_t child = fork();
    if (child < 0) die("fork");
    if (child == 0) {
        signal(SIGTERM, SIG_DFL);
        sigprocmask(SIG_SETMASK, &old, NULL);
        run_child(&o, supervisor, &argv[i]);
    }
    setpgid(child, child); /* also done by the child: whichever runs first */
    child_group = child;
    sigprocmask(SIG_SETMASK, &old, NULL);

    int status = 0, have = 0;
    for (;;) {
        int st;
        pid_t p = waitpid(-1, &st, 0);
        if (p < 0) {
            if (errno == EINTR) continue;
            break; /* ECHILD: every descendant is reaped */
        }
        if (p == child) {
            status = st;
            have = 1;
            kill(-child, SIGKILL); /* whatever it left behind */
        }
    }
    if (!have) return 126;
    if (WIFEXITED(status)) return WEXITSTATUS(status);
    int sig = WTERMSIG(status);
    set_limit(RLIMIT_CORE, "RLIMIT_CORE", 0, 0);
    signal(sig, SIG_DFL);
    sigset_t only;
    sigemptyset(&only);
    sigaddset(&only, sig);
    sigprocmask(SIG_UNBLOCK, &only, NULL);
    raise(sig);
    return 128 + sig;
}
