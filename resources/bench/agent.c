// The workload program of `rvmm bench`: one static binary that runs as a plain process, in a
// crun container and (as /init) inside a microVM guest, so that all of them run the same code.
//
//   agent echo                 print the marker line and exit (start latency)
//   agent idle                 print the marker line, then sleep until killed (memory)
//   agent cpu ROUNDS           dense 128x128 double matrix multiply, ROUNDS times; prints MFLOP/s
//   agent spin N               N iterations of the tiny guest's 2-instruction loop; prints MIPS
//   agent syscall N            N getppid system calls; prints the mean time of one
//   agent rr-server PORT       TCP echo of 1-byte messages (request/response latency)
//   agent rr-client IP PORT N  N 1-byte round trips (at most 5 s of them); prints the mean round
//                              trip in microseconds
//   agent fs DIR               extracts DIR/tree.tar into DIR/untar and syncs, then reads DIR/big;
//                              prints the seconds of the first and the MiB/s of the second
//   as PID 1 (guest /init)     mounts /proc, /dev and /tmp, prints RVMM-BENCH-GUEST ready,
//                              times 200 system calls, runs the steps named by rvmm_bench= on
//                              the kernel command line, prints RVMM-BENCH-GUEST done, powers off.
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <net/if.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define N 128
#define RR_SECONDS 5.0
static double a[N][N], b[N][N], c[N][N];

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int cpu(long rounds) {
    // Every page is touched before the clock starts: page faults are not the workload.
    for (int i = 0; i < N; i++)
        for (int j = 0; j < N; j++) {
            a[i][j] = (i * 7 + j) % 13 / 13.0;
            b[i][j] = (i + j * 5) % 11 / 11.0;
            c[i][j] = 0;
        }
    double t0 = now();
    for (long r = 0; r < rounds; r++)
        for (int i = 0; i < N; i++)
            for (int k = 0; k < N; k++) {
                double x = a[i][k] + r * 1e-9;
                for (int j = 0; j < N; j++) c[i][j] += x * b[k][j];
            }
    double secs = now() - t0;
    printf("RVMM-BENCH cpu mflops=%.3f check=%.3e\n", 2.0 * N * N * N * rounds / secs / 1e6,
           c[N / 2][N / 3]);
    return 0;
}

static int spin(long n) {
    double t0 = now();
    __asm__ volatile("1: dec %0\n\tjnz 1b" : "+r"(n));
    printf("RVMM-BENCH spin seconds=%.9f\n", now() - t0);
    return 0;
}

static int syscalls(long n) {
    double t0 = now();
    for (long i = 0; i < n; i++) syscall(SYS_getppid);
    printf("RVMM-BENCH syscall usec=%.3f\n", (now() - t0) / n * 1e6);
    return 0;
}

static int rr_server(int port) {
    int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port)};
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(s, (struct sockaddr *)&sa, sizeof sa) || listen(s, 4)) return perror("rr-server"), 1;
    printf("RVMM-BENCH rr-server ready\n");
    fflush(stdout);
    // One process per client: a guest that is stopped mid-test never closes its connection,
    // and the next client must not wait behind it.
    signal(SIGCHLD, SIG_IGN);
    for (;;) {
        int c = accept(s, 0, 0);
        if (c < 0 || fork()) {
            close(c);
            continue;
        }
        char ch;
        setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        while (read(c, &ch, 1) == 1 && write(c, &ch, 1) == 1) {}
        _exit(0);
    }
}

static int rr_client(const char *ip, int port, long n) {
    int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, ip, &sa.sin_addr);
    for (int tries = 0; connect(s, (struct sockaddr *)&sa, sizeof sa); tries++) {
        if (tries == 50) return perror("rr-client"), 1;
        usleep(100000);
    }
    setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    char ch = 'x';
    double t0 = now(), t = t0;
    long done = 0;
    // At most RR_SECONDS: a round trip costs ~100 ms in a guest on an emulating KVM.
    for (; done < n && t - t0 < RR_SECONDS; done++, t = now())
        if (write(s, &ch, 1) != 1 || read(s, &ch, 1) != 1) return perror("rr-client"), 1;
    printf("RVMM-BENCH rr usec=%.3f count=%ld\n", (t - t0) / done * 1e6, done);
    close(s);
    return 0;
}

static char buf[1 << 20];

// Reads exactly n bytes (n <= sizeof buf) unless the file ends first.
static long read_full(int fd, long n) {
    long got = 0;
    for (long r; got < n && (r = read(fd, buf + got, n - got)) > 0;) got += r;
    return got;
}

// One ustar member (directory or regular file, as `tar --format=ustar` writes them) created
// under `root`, with its mode and mtime; other types are skipped. Returns 1 for a file.
static int untar_member(int in, int root, const char *h) {
    char name[300];
    long size = strtol(h + 124, 0, 8), padded = (size + 511) / 512 * 512;
    mode_t mode = strtol(h + 100, 0, 8) & 07777;
    struct timespec mtime[2] = {{strtol(h + 136, 0, 8), 0}, {strtol(h + 136, 0, 8), 0}};
    snprintf(name, sizeof name, "%.155s%s%.100s", h + 345, h[345] ? "/" : "", h);
    if (h[156] == '5') return mkdirat(root, name, mode) && errno != EEXIST ? -1 : 0;
    int out = h[156] == '0' || h[156] == 0 ? openat(root, name, O_WRONLY | O_CREAT | O_TRUNC, mode) : -2;
    if (out == -1) return -1;
    for (long left = padded; left > 0;) {
        long chunk = left < (long)sizeof buf ? left : (long)sizeof buf;
        if (read_full(in, chunk) != chunk) return -1;
        long data = size - (padded - left);
        if (out >= 0 && data > 0 && write(out, buf, data < chunk ? data : chunk) < 0) return -1;
        left -= chunk;
    }
    if (out < 0) return 0;
    futimens(out, mtime);
    close(out);
    return 1;
}

// Extracts DIR/tree.tar into DIR/untar and syncs that file system: done means on the host.
static long untar(const char *dir) {
    char path[4096];
    snprintf(path, sizeof path, "%s/tree.tar", dir);
    int in = open(path, O_RDONLY);
    snprintf(path, sizeof path, "%s/untar", dir);
    if (in < 0 || mkdir(path, 0755)) return perror(path), -1;
    int root = open(path, O_RDONLY | O_DIRECTORY);
    long files = 0;
    char h[512];
    while (read(in, h, sizeof h) == sizeof h && h[0]) {
        int r = untar_member(in, root, h);
        if (r < 0) return perror(h), -1;
        files += r;
    }
    syncfs(root);
    close(root);
    close(in);
    return files;
}

static int fs(const char *dir, const char *label) {
    char path[4096];
    double t0 = now();
    long files = untar(dir);
    double untar_s = now() - t0;
    if (files < 0) return printf("RVMM-BENCH %s error=untar failed\n", label), 1;
    snprintf(path, sizeof path, "%s/big", dir);
    int in = open(path, O_RDONLY);
    if (in < 0) return printf("RVMM-BENCH %s error=%s\n", label, strerror(errno)), 1;
    long long total = 0;
    t0 = now();
    for (long r; (r = read(in, buf, sizeof buf)) > 0;) total += r;
    double read_s = now() - t0;
    close(in);
    printf("RVMM-BENCH %s untar_s=%.3f files=%ld read_mibs=%.1f\n", label, untar_s, files,
           total / 1048576.0 / read_s);
    return 0;
}

// The fs step in the guest: the virtio-fs share, then the first ext4 virtio-blk disk.
static void guest_fs(void) {
    mkdir("/tmp/fs", 0755);
    mkdir("/tmp/blk", 0755);
    if (mount("benchfs", "/tmp/fs", "virtiofs", 0, 0) == 0) fs("/tmp/fs", "fs-virtiofs");
    else printf("RVMM-BENCH fs-virtiofs error=%s\n", strerror(errno));
    char dev[] = "/dev/vdb";
    for (; dev[7] <= 'h'; dev[7]++)
        if (mount(dev, "/tmp/blk", "ext4", 0, 0) == 0) {
            fs("/tmp/blk", "fs-blk");
            umount("/tmp/blk");
            return;
        }
    printf("RVMM-BENCH fs-blk error=no ext4 disk\n");
}

// Runs a program from the guest root and waits for it.
static void run(char *const argv[]) {
    pid_t pid = fork();
    if (pid == 0) {
        execv(argv[0], argv);
        _exit(127);
    }
    waitpid(pid, 0, 0);
}

// eth0 gets ADDR/30 and comes up: the host end of the TAP is the other address of the /30.
static int net_up(const char *addr) {
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    struct ifreq ifr = {0};
    struct sockaddr_in *sin = (struct sockaddr_in *)&ifr.ifr_addr;
    strcpy(ifr.ifr_name, "eth0");
    sin->sin_family = AF_INET;
    inet_pton(AF_INET, addr, &sin->sin_addr);
    if (ioctl(s, SIOCSIFADDR, &ifr)) return -1;
    inet_pton(AF_INET, "255.255.255.252", &sin->sin_addr);
    if (ioctl(s, SIOCSIFNETMASK, &ifr)) return -1;
    ifr.ifr_flags = IFF_UP | IFF_RUNNING;
    return ioctl(s, SIOCSIFFLAGS, &ifr);
}

static void on_alarm(int sig) { (void)sig; }

static int guest_init(void) {
    char cmdline[4096] = {0}, steps[256] = "", guest_ip[32] = "", host_ip[32] = "";
    mount("proc", "/proc", "proc", 0, 0);
    mount("devtmpfs", "/dev", "devtmpfs", 0, 0);
    // iperf3 keeps its send buffer in a file in /tmp: RAM, not the root disk.
    mount("tmpfs", "/tmp", "tmpfs", 0, "size=16m");
    FILE *f = fopen("/proc/cmdline", "r");
    if (f) fread(cmdline, 1, sizeof cmdline - 1, f);
    char *p;
    if ((p = strstr(cmdline, "rvmm_bench="))) sscanf(p, "rvmm_bench=%255s", steps);
    if ((p = strstr(cmdline, "rvmm_bench_ip="))) sscanf(p, "rvmm_bench_ip=%31[^,],%31s", guest_ip, host_ip);
    setvbuf(stdout, 0, _IOLBF, 0);
    printf("RVMM-BENCH-GUEST ready\n");
    syscalls(200);
    if (strstr(steps, "cpu")) cpu(atol(strstr(steps, "cpu:") ? strstr(steps, "cpu:") + 4 : "20"));
    if (strstr(steps, "disk"))
        // One fio for both jobs: starting fio (60 shared libraries) takes minutes on an
        // emulating KVM.
        run((char *const[]){"/bin/fio", "--filename=/dev/vdb", "--readonly", "--direct=1",
                            "--ioengine=libaio", "--runtime=2", "--time_based",
                            "--output-format=terse", "--terse-version=3", "--name=randread",
                            "--rw=randread", "--bs=4k", "--iodepth=32", "--name=seqread",
                            "--stonewall", "--rw=read", "--bs=1M", "--iodepth=4", 0});
    if (strstr(steps, "net") && guest_ip[0] && net_up(guest_ip) == 0) {
        printf("RVMM-BENCH iperf3-begin\n");
        run((char *const[]){"/bin/iperf3", "-c", host_ip, "-t", "2", "-i", "0", "-J", 0});
        printf("RVMM-BENCH iperf3-end\n");
        // The other way: the host sends, the guest receives (its receive queue).
        printf("RVMM-BENCH iperf3-reverse-begin\n");
        run((char *const[]){"/bin/iperf3", "-c", host_ip, "-R", "-t", "2", "-i", "0", "-J", 0});
        printf("RVMM-BENCH iperf3-reverse-end\n");
        rr_client(host_ip, 5299, 2000);
    }
    if (strstr(steps, "fs")) guest_fs();
    printf("RVMM-BENCH-GUEST done\n");
    // The console tty sends its queue from the UART interrupt: a reboot now would drop the
    // last lines. Wait for it to drain, but at most 5 s (the alarm interrupts tcdrain).
    struct sigaction wake = {.sa_handler = on_alarm};
    sigaction(SIGALRM, &wake, 0);
    alarm(5);
    tcdrain(STDOUT_FILENO);
    alarm(0);
    sync();
    reboot(RB_POWER_OFF);
    return 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, 0, _IOLBF, 0);
    const char *mode = argc > 1 ? argv[1] : "";
    if (!strcmp(mode, "echo") || !strcmp(mode, "idle")) {
        printf("RVMM-BENCH hello\n");
        fflush(stdout);
        while (!strcmp(mode, "idle")) pause();
        return 0;
    }
    if (!strcmp(mode, "cpu") && argc == 3) return cpu(atol(argv[2]));
    if (!strcmp(mode, "spin") && argc == 3) return spin(atol(argv[2]));
    if (!strcmp(mode, "syscall") && argc == 3) return syscalls(atol(argv[2]));
    if (!strcmp(mode, "rr-server") && argc == 3) return rr_server(atoi(argv[2]));
    if (!strcmp(mode, "fs") && argc == 3) return fs(argv[2], "fs");
    if (!strcmp(mode, "rr-client") && argc == 5) return rr_client(argv[2], atoi(argv[3]), atol(argv[4]));
    // The guest kernel starts /init with the command line's words that are neither its own
    // parameters nor NAME=VALUE (such as `noxsave`); in a container's pid namespace the agent
    // is PID 1 too, but always with one of the modes above.
    if (getpid() == 1) return guest_init();
    fprintf(stderr, "usage: agent echo|idle|cpu ROUNDS|spin N|syscall N|rr-server PORT|"
                    "rr-client IP PORT N|fs DIR\n");
    return 2;
}
