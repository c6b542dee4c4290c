/* The isolation steps of the sodkern-sandbox launcher (launcher.c): Landlock, seccomp, --expose. */
#ifndef SODKERN_SANDBOX_ISOLATION_H
#define SODKERN_SANDBOX_ISOLATION_H

#define MAX_PATHS 64

/* Print "sodkern-sandbox: what: strerror(errno)" and exit 126 (fd 2; no atexit handlers run). */
void die(const char *what);

/* The Landlock ABI the kernel offers (0: none). */
int landlock_abi(void);
/* Restrict writes to `writes` and, if any are given, reads to `reads`; TCP and (ABI >= 6) signals and
 * abstract unix sockets to the own domain.  Returns the ABI applied (0: not available, nothing restricted). */
int apply_landlock(char **writes, int nwrite, char **reads, int nread);
/* Which calls a filter denies: all of them (the launcher); a fork server's share (all but the mounts and
 * setsid it does for each snippet, plus System V / POSIX message-queue IPC); a snippet's share (those three). */
enum { SBX_FILTER_ALL, SBX_FILTER_SERVER, SBX_FILTER_SNIPPET };
/* Install a seccomp filter; `restrict_signals`: signals only to the process itself and its own group. */
void apply_seccomp(int restrict_signals, int part);
/* Install an allow-all filter to see whether seccomp filters work here (needs PR_SET_NO_NEW_PRIVS). */
int seccomp_works(void);
/* Make each directory reachable at its own path for an unprivileged user (private mount namespace). */
void expose_paths(char **paths, int n);
/* Whether this process may create a private mount namespace (probes in a child). */
int can_unshare_mounts(void);

#endif
