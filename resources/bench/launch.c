// The launcher of `rvmm bench`: `launch REPORT PROGRAM ARGS...` forks, execs PROGRAM (an
// absolute path) with ARGS, reaps it with wait4 and writes one line to the file REPORT:
//
//   status=S maxrss_kib=K utime_us=U stime_us=T fork_ns=F reap_ns=R
//
// S is the raw wait status, F and R are CLOCK_MONOTONIC just before fork and just after wait4.
// Linux carries a parent's RSS high-water mark into its child across fork and exec, so the
// ru_maxrss of a command started by the bench itself is at least the bench's own peak. This
// launcher is built without libc (-nostdlib, raw system calls): its own peak is a few pages,
// and that is all its child inherits. It exits with the child's exit code (128 + signal).

typedef unsigned long u64;

struct timespec64 {
    long sec, nsec;
};
struct timeval64 {
    long sec, usec;
};
struct rusage64 {
    struct timeval64 utime, stime;
    long maxrss, rest[13];
};

__asm__(".global _start\n"
        "_start:\n"
        "  xor %ebp, %ebp\n"
        "  mov %rsp, %rdi\n"
        "  and $-16, %rsp\n"
        "  call start_c\n"
        "  hlt\n");

static long sys(long n, long a, long b, long c, long d) {
    register long r10 __asm__("r10") = d;
    long ret;
    __asm__ volatile("syscall"
                     : "=a"(ret)
                     : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10)
                     : "rcx", "r11", "memory");
    return ret;
}

enum { SYS_WRITE = 1, SYS_CLOSE = 3, SYS_FORK = 57, SYS_EXECVE = 59, SYS_EXIT = 60, SYS_WAIT4 = 61,
       SYS_CLOCK_GETTIME = 228, SYS_OPENAT = 257 };
enum { AT_FDCWD = -100, O_WRONLY_CREAT_TRUNC_CLOEXEC = 01 | 0100 | 01000 | 02000000 };
enum { CLOCK_MONOTONIC = 1, EINTR = 4 };

static __attribute__((noreturn)) void quit(long code) {
    for (;;) sys(SYS_EXIT, code, 0, 0, 0);
}

static u64 now_ns(void) {
    struct timespec64 ts;
    sys(SYS_CLOCK_GETTIME, CLOCK_MONOTONIC, (long)&ts, 0, 0);
    return (u64)ts.sec * 1000000000 + (u64)ts.nsec;
}

static char *put_str(char *p, const char *s) {
    while (*s) *p++ = *s++;
    return p;
}

static char *put_num(char *p, const char *key, u64 v) {
    char digits[24];
    int n = 0;
    p = put_str(p, key);
    do digits[n++] = '0' + v % 10; while ((v /= 10));
    while (n) *p++ = digits[--n];
    return p;
}

static u64 usec(struct timeval64 tv) {
    return (u64)tv.sec * 1000000 + (u64)tv.usec;
}

__attribute__((used)) void start_c(long *sp) {
    long argc = sp[0];
    char **argv = (char **)(sp + 1), **envp = argv + argc + 1;
    if (argc < 3) quit(2);
    long fd = sys(SYS_OPENAT, AT_FDCWD, (long)argv[1], O_WRONLY_CREAT_TRUNC_CLOEXEC, 0600);
    if (fd < 0) quit(126);
    u64 fork_ns = now_ns();
    long pid = sys(SYS_FORK, 0, 0, 0, 0);
    if (pid == 0) {
        sys(SYS_EXECVE, (long)argv[2], (long)(argv + 2), (long)envp, 0);
        quit(127);
    }
    if (pid < 0) quit(126);
    static struct rusage64 ru;
    int status = 0;
    long rc;
    while ((rc = sys(SYS_WAIT4, pid, (long)&status, 0, (long)&ru)) == -EINTR) {}
    u64 reap_ns = now_ns();
    if (rc != pid) quit(126);
    static char line[256];
    char *p = put_num(line, "status=", (unsigned)status);
    p = put_num(p, " maxrss_kib=", (u64)ru.maxrss);
    p = put_num(p, " utime_us=", usec(ru.utime));
    p = put_num(p, " stime_us=", usec(ru.stime));
    p = put_num(p, " fork_ns=", fork_ns);
    p = put_num(p, " reap_ns=", reap_ns);
    *p++ = '\n';
    sys(SYS_WRITE, fd, (long)line, p - line, 0);
    sys(SYS_CLOSE, fd, 0, 0, 0);
    int sig = status & 0x7f;
    quit(sig ? 128 + sig : (status >> 8) & 0xff);
}
