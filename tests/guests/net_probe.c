/* Guest side of tests/net.rs's checks that busybox cannot do.
 *
 *   net_probe send HOST PORT BYTES SEED
 *                              connect to HOST:PORT over TCP and send BYTES bytes of the
 *                              xorshift64* stream seeded with SEED (see tests/net.rs), then
 *                              close; the host checks what arrived
 *   net_probe recv HOST PORT SEED
 *                              connect to HOST:PORT over TCP, read to EOF and compare what
 *                              arrived with the same stream (the host sends it)
 *   net_probe echo PORT        listen on vsock PORT, echo one connection's bytes until EOF
 *   net_probe call PORT MSG    connect to the host (CID 2) at vsock PORT, send MSG and a
 *                              newline, read one line back
 *
 * Results go to the kernel log as "RVMM-NET tcp ..." and "RVMM-NET vsock ..." lines (see
 * net_init.sh).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/errqueue.h>
#include <linux/vm_sockets.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

/* "tcp" or "vsock": the first word after RVMM-NET in every report. */
static const char *topic = "vsock";

static void report(const char *fmt, ...)
{
    char line[512];
    int n = snprintf(line, sizeof line, "RVMM-NET %s ", topic);
    va_list ap;
    va_start(ap, fmt);
    n += vsnprintf(line + n, sizeof line - n, fmt, ap);
    va_end(ap);
    int fd = open("/dev/kmsg", O_WRONLY);
    if (fd >= 0) {
        write(fd, line, n < (int)sizeof line ? n : (int)sizeof line - 1);
        close(fd);
    }
}

static int fail(const char *what)
{
    report("%s failed: %s\n", what, strerror(errno));
    return 1;
}

/* fail() for what returns a file descriptor. */
static int fail_fd(const char *what)
{
    fail(what);
    return -1;
}

static struct sockaddr_vm vsock_addr(unsigned cid, const char *port)
{
    struct sockaddr_vm addr = {.svm_family = AF_VSOCK, .svm_cid = cid};
    addr.svm_port = (unsigned)strtoul(port, NULL, 10);
    return addr;
}

static int echo(const char *port)
{
    struct sockaddr_vm addr = vsock_addr(VMADDR_CID_ANY, port);
    int s = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (s < 0)
        return fail("socket");
    if (bind(s, (struct sockaddr *)&addr, sizeof addr) < 0)
        return fail("bind");
    if (listen(s, 1) < 0)
        return fail("listen");
    report("echo listening on port %s\n", port);
    int c = accept(s, NULL, NULL);
    if (c < 0)
        return fail("accept");
    char buf[4096];
    size_t total = 0;
    ssize_t n;
    while ((n = read(c, buf, sizeof buf)) > 0) {
        if (write(c, buf, n) != n)
            return fail("echo write");
        total += n;
    }
    report("echo served %zu bytes\n", total);
    close(c);
    return 0;
}

static int call(const char *port, const char *msg)
{
    struct sockaddr_vm addr = vsock_addr(VMADDR_CID_HOST, port);
    int s = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (s < 0)
        return fail("socket");
    if (connect(s, (struct sockaddr *)&addr, sizeof addr) < 0)
        return fail("connect");
    char out[256];
    int len = snprintf(out, sizeof out, "%s\n", msg);
    if (write(s, out, len) != len)
        return fail("write");
    char reply[256];
    size_t got = 0;
    while (got < sizeof reply - 1) {
        ssize_t n = read(s, reply + got, 1);
        if (n <= 0 || reply[got] == '\n')
            break;
        got += n;
    }
    reply[got] = 0;
    report("host replied: %s\n", reply);
    close(s);
    return 0;
}

/* Sending buffers, each refilled only once the kernel has let go of it: double buffering in
 * chunks that cover several 64 KiB frames. */
#define CHUNK (512 << 10)
#define NBUF 2
#define SOURCE_PORT 40000
/* Most zero-copy sends in flight before waiting for completions (a few ever are). */
#define WINDOW 256

struct sender {
    int sock;
    int zerocopy;
    /* Zero-copy sends so far: the kernel numbers them from 0 and reports ranges of them done,
     * not necessarily in order. */
    uint32_t issued;
    uint32_t in_flight;
    /* The buffer of each send in flight, by number modulo WINDOW. */
    uint8_t owner[WINDOW];
    /* Sends in flight per buffer. */
    uint32_t pending[NBUF];
    int copied;
};

/* Waits for the next zero-copy completion and accounts for the sends it reports. */
static int reap(struct sender *s)
{
    char control[128];
    struct msghdr msg = {.msg_control = control, .msg_controllen = sizeof control};
    while (recvmsg(s->sock, &msg, MSG_ERRQUEUE) < 0) {
        if (errno != EAGAIN && errno != EINTR)
            return -1;
        /* Completions arrive as socket errors. */
        struct pollfd p = {.fd = s->sock, .events = 0};
        poll(&p, 1, -1);
        msg.msg_controllen = sizeof control;
    }
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
        struct sock_extended_err *e = (struct sock_extended_err *)CMSG_DATA(c);
        if (e->ee_origin != SO_EE_ORIGIN_ZEROCOPY)
            continue;
        for (uint32_t id = e->ee_info; id != e->ee_data + 1; id++) {
            s->pending[s->owner[id % WINDOW]]--;
            s->in_flight--;
        }
        s->copied |= e->ee_code & SO_EE_CODE_ZEROCOPY_COPIED;
    }
    return 0;
}

/* Sends all `len` bytes of buffer `i`. */
static int send_buffer(struct sender *s, int i, const char *buf, size_t len)
{
    for (size_t done = 0; done < len;) {
        while (s->zerocopy && s->in_flight >= WINDOW)
            if (reap(s) < 0)
                return -1;
        ssize_t n = send(s->sock, buf + done, len - done, s->zerocopy ? MSG_ZEROCOPY : 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == ENOBUFS && s->in_flight) {
            /* Too much memory pinned: let some sends complete. */
            if (reap(s) < 0)
                return -1;
            continue;
        }
        if (n <= 0)
            return -1;
        done += n;
        if (s->zerocopy) {
            s->owner[s->issued++ % WINDOW] = i;
            s->pending[i]++;
            s->in_flight++;
        }
    }
    return 0;
}

/* A TCP connection to HOST:PORT from local port `source_port`; -1 after a report. A fixed
 * source port: the first ephemeral port the kernel picks fills a 256 KiB perturbation table
 * with random bytes, ~15 s of an emulated guest kernel's time. */
static int tcp_connect(const char *host, const char *port, uint16_t source_port)
{
    topic = "tcp";
    struct sockaddr_in addr = {.sin_family = AF_INET};
    addr.sin_port = htons((uint16_t)strtoul(port, NULL, 10));
    if (inet_pton(AF_INET, host, &addr.sin_addr) != 1) {
        errno = EINVAL;
        return fail_fd("host address");
    }
    int sock = socket(AF_INET, SOCK_STREAM, 0);
    if (sock < 0)
        return fail_fd("socket");
    struct sockaddr_in local = {.sin_family = AF_INET, .sin_port = htons(source_port)};
    if (bind(sock, (struct sockaddr *)&local, sizeof local) < 0)
        return fail_fd("bind");
    if (connect(sock, (struct sockaddr *)&addr, sizeof addr) < 0)
        return fail_fd("connect");
    return sock;
}

static int tcp_send(const char *host, const char *port, const char *bytes, const char *seed)
{
    struct sender s = {.sock = tcp_connect(host, port, SOURCE_PORT)};
    if (s.sock < 0)
        return 1;
    /* Copying from user memory is most of an emulated guest kernel's work per frame (16 MiB
     * took 78 s copied, 13-23 s zero-copy): with zero-copy, frames point at these pages. */
    int one = 1;
    s.zerocopy = !setsockopt(s.sock, SOL_SOCKET, SO_ZEROCOPY, &one, sizeof one);
    char *bufs = mmap(NULL, NBUF * CHUNK, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (bufs == MAP_FAILED)
        return fail("mmap");
    /* xorshift64*; the stream is its outputs as little-endian words (x86 byte order). */
    uint64_t state = strtoull(seed, NULL, 10) | 1;
    unsigned long long total = strtoull(bytes, NULL, 10);
    for (unsigned long long left = total, n = 0; left; n++) {
        int i = n % NBUF;
        uint64_t *words = (uint64_t *)(bufs + (size_t)i * CHUNK);
        while (s.pending[i])
            if (reap(&s) < 0)
                return fail("zero-copy completion");
        for (size_t w = 0; w < CHUNK / sizeof *words; w++) {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            words[w] = state * 0x2545F4914F6CDD1DULL;
        }
        size_t len = left < CHUNK ? left : CHUNK;
        if (send_buffer(&s, i, (const char *)words, len) < 0)
            return fail("send");
        left -= len;
    }
    if (close(s.sock) < 0)
        return fail("close");
    report("sent %llu bytes%s\n", total,
           !s.zerocopy ? "" : s.copied ? " (zero-copy fell back to copies)" : " (zero-copy)");
    return 0;
}

/* The byte at `pos` of the stream, given its words in order: xorshift64* outputs as
 * little-endian words. */
static unsigned char stream_byte(uint64_t *state, uint64_t *word, unsigned long long pos)
{
    if (pos % 8 == 0) {
        *state ^= *state >> 12;
        *state ^= *state << 25;
        *state ^= *state >> 27;
        *word = *state * 0x2545F4914F6CDD1DULL;
    }
    return (unsigned char)(*word >> (8 * (pos % 8)));
}

static int tcp_recv(const char *host, const char *port, const char *seed)
{
    int sock = tcp_connect(host, port, SOURCE_PORT + 1);
    if (sock < 0)
        return 1;
    static unsigned char buf[CHUNK];
    uint64_t state = strtoull(seed, NULL, 10) | 1, word = 0;
    unsigned long long got = 0, first_bad = ~0ULL;
    for (;;) {
        ssize_t n = read(sock, buf, sizeof buf);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return fail("read");
        if (n == 0)
            break;
        for (ssize_t i = 0; i < n; i++, got++)
            if (buf[i] != stream_byte(&state, &word, got) && first_bad == ~0ULL)
                first_bad = got;
    }
    close(sock);
    if (first_bad != ~0ULL)
        report("received %llu bytes, not the stream from byte %llu\n", got, first_bad);
    else
        report("received %llu bytes of the stream\n", got);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 6 && !strcmp(argv[1], "send"))
        return tcp_send(argv[2], argv[3], argv[4], argv[5]);
    if (argc == 5 && !strcmp(argv[1], "recv"))
        return tcp_recv(argv[2], argv[3], argv[4]);
    if (argc == 3 && !strcmp(argv[1], "echo"))
        return echo(argv[2]);
    if (argc == 4 && !strcmp(argv[1], "call"))
        return call(argv[2], argv[3]);
    report("usage: net_probe send HOST PORT BYTES SEED | recv HOST PORT SEED | echo PORT | "
           "call PORT MSG\n");
    return 2;
}
