/* Guest side of tests/net.rs's checks that busybox cannot do.
 *
 *   net_probe data BYTES       write BYTES pseudo-random bytes to stdout, generated in user
 *                              mode (the emulated guest kernel's /dev/urandom is far too slow)
 *   net_probe echo PORT        listen on vsock PORT, echo one connection's bytes until EOF
 *   net_probe call PORT MSG    connect to the host (CID 2) at vsock PORT, send MSG and a
 *                              newline, read one line back
 *
 * vsock results go to the kernel log as "RVMM-NET vsock ..." lines (see net_init.sh).
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/vm_sockets.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>
#include <sys/auxv.h>
#include <sys/socket.h>
#include <unistd.h>

static void report(const char *fmt, ...)
{
    char line[512];
    int n = snprintf(line, sizeof line, "RVMM-NET vsock ");
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

static int data(const char *bytes)
{
    /* xorshift64*, seeded from the 16 random bytes the kernel gives every process */
    uint64_t state;
    memcpy(&state, (const void *)getauxval(AT_RANDOM), sizeof state);
    state |= 1;
    static uint64_t block[8192];
    unsigned long long left = strtoull(bytes, NULL, 10);
    while (left) {
        for (size_t i = 0; i < sizeof block / sizeof block[0]; i++) {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            block[i] = state * 0x2545F4914F6CDD1DULL;
        }
        size_t len = left < sizeof block ? left : sizeof block;
        const char *p = (const char *)block;
        for (size_t done = 0; done < len;) {
            ssize_t n = write(1, p + done, len - done);
            if (n <= 0)
                return fail("data write");
            done += n;
        }
        left -= len;
    }
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 3 && !strcmp(argv[1], "data"))
        return data(argv[2]);
    if (argc == 3 && !strcmp(argv[1], "echo"))
        return echo(argv[2]);
    if (argc == 4 && !strcmp(argv[1], "call"))
        return call(argv[2], argv[3]);
    report("usage: net_probe data BYTES | echo PORT | call PORT MSG\n");
    return 2;
}
