/*
 * cairn-agent: the agent inside an `isolation: vm` container's microVM (Kata's agent is
 * the model). It is PID 1 of the guest once /init has mounted the container's root
 * filesystem (virtiofs) at ROOT, and talks to the host over one virtio-serial port.
 *
 * Wire format, both ways (compute/guest_agent.py is the host side):
 *   magic 0xCA 0x1F | type (1) | stream (4, big endian) | length (4, big endian) | payload
 * Host -> guest: HELLO (nonce), CONFIG (the container: main process, mounts, limits),
 *   EXEC (a new process on a new stream), STDIN, EOF, RESIZE ("rows cols"), SIGNAL
 *   ("n"), CLOSE (kill the stream's process group).
 * Guest -> host: READY (nonce + "started=0|1"), STARTED ("pid"), STDOUT, STDERR,
 *   EXIT ("code"), ERROR (text).
 * CONFIG and EXEC payloads are NUL-terminated "key=value" strings: arg= (repeated),
 * env= (repeated), cwd=, tty=0|1, rows=, cols=, and for CONFIG: hostname=, mem= (bytes),
 * cpu= (quota in us per 100 ms, 0 = none), pids=, mount=SERIAL:FS:ro|rw:PATH (repeated).
 *
 * Stream 1 is the container's main process; when it exits the agent flushes its output,
 * unmounts the volumes and powers the guest off (the host then sees the container stop).
 * Processes run chrooted into ROOT, in the cgroup /sys/fs/cgroup/container (memory.max,
 * cpu.max, pids.max from CONFIG). The host may go away and come back at any time (the
 * node agent restarts): output waits in a bounded buffer, and both sides resynchronise
 * on the magic bytes (the host repeats HELLO until its nonce comes back in READY).
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define PORT_NAME "org.cairn.agent.0"
#define CGROUP "/sys/fs/cgroup/container"
#define HDR 11
#define MAX_IN (1 << 20)       /* largest frame the host may send */
#define OUT_HIGH (1 << 20)     /* stop reading children's output above this */
#define MAX_PROCS 64
#define MAX_MOUNTS 16

enum { T_HELLO = 1, T_READY, T_CONFIG, T_EXEC, T_STDIN, T_EOF, T_RESIZE, T_SIGNAL, T_CLOSE,
       T_STARTED = 20, T_STDOUT, T_STDERR, T_EXIT, T_ERROR };

struct proc {
    uint32_t stream;
    pid_t pid;
    int in, out, err;        /* our ends; -1 when closed (a tty: in == out == the master) */
    int tty, exited, status;
    char *inbuf; size_t inlen; /* host input not yet written */
    int in_eof;
};

static const char *root = "/mnt/root";
static int port = -1;
static int connected;
static unsigned char *outbuf; static size_t outlen, outcap;
static unsigned char *inb; static size_t inblen;
static struct proc procs[MAX_PROCS];
static int main_started, main_done;
static struct timespec main_done_at;
static char mounts[MAX_MOUNTS][600]; static int nmounts;

static void say(const char *fmt, const char *arg)
{
    int fd = open("/dev/ttyS0", O_WRONLY | O_NOCTTY | O_CLOEXEC);
    if (fd >= 0) { dprintf(fd, fmt, arg); close(fd); }
}

static void put(uint8_t type, uint32_t stream, const void *data, size_t len)
{
    if (outlen + HDR + len > outcap) {
        size_t cap = outcap ? outcap : 65536;
        while (cap < outlen + HDR + len) cap *= 2;
        unsigned char *p = realloc(outbuf, cap);
        if (!p) return;  /* out of memory: drop the frame rather than the guest */
        outbuf = p; outcap = cap;
    }
    unsigned char *h = outbuf + outlen;
    h[0] = 0xCA; h[1] = 0x1F; h[2] = type;
    h[3] = stream >> 24; h[4] = stream >> 16; h[5] = stream >> 8; h[6] = stream;
    h[7] = len >> 24; h[8] = len >> 16; h[9] = len >> 8; h[10] = len;
    memcpy(h + HDR, data, len);
    outlen += HDR + len;
}

static void putf(uint8_t type, uint32_t stream, const char *fmt, long v)
{
    char b[64];
    int n = snprintf(b, sizeof b, fmt, v);
    put(type, stream, b, n);
}

static void error_to(uint32_t stream, const char *what, int err)
{
    char b[512];
    int n = snprintf(b, sizeof b, "%s: %s", what, strerror(err));
    put(T_ERROR, stream, b, n);
}

static void flush_out(void)
{
    while (outlen && connected) {
        ssize_t n = write(port, outbuf, outlen);
        if (n <= 0) return;
        memmove(outbuf, outbuf + n, outlen - n);
        outlen -= n;
    }
}

static int write_file(const char *path, const char *value)
{
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    ssize_t n = write(fd, value, strlen(value));
    close(fd);
    return n < 0 ? -1 : 0;
}

static struct proc *find(uint32_t stream)
{
    for (int i = 0; i < MAX_PROCS; i++)
        if (procs[i].stream == stream && procs[i].pid) return &procs[i];
    return NULL;
}

static void nonblock(int fd) { fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK); }

/* key=value strings of a CONFIG/EXEC payload */
struct spec { char *argv[258]; int argc; char *envp[258]; int envc; const char *cwd; int tty, rows, cols; };

static void parse_spec(char *p, size_t len, struct spec *s, void (*extra)(const char *))
{
    memset(s, 0, sizeof *s);
    s->cwd = "/"; s->rows = 24; s->cols = 80;
    char *end = p + len;
    while (p < end) {
        char *kv = p;
        size_t n = strnlen(p, end - p);
        if (p + n >= end) break;  /* not NUL-terminated: ignore the rest */
        p += n + 1;
        if (!strncmp(kv, "arg=", 4) && s->argc < 256) s->argv[s->argc++] = kv + 4;
        else if (!strncmp(kv, "env=", 4) && s->envc < 256) s->envp[s->envc++] = kv + 4;
        else if (!strncmp(kv, "cwd=", 4)) s->cwd = kv + 4;
        else if (!strncmp(kv, "tty=", 4)) s->tty = kv[4] == '1';
        else if (!strncmp(kv, "rows=", 5)) s->rows = atoi(kv + 5);
        else if (!strncmp(kv, "cols=", 5)) s->cols = atoi(kv + 5);
        else if (extra) extra(kv);
    }
    s->argv[s->argc] = NULL;
    s->envp[s->envc] = NULL;
}

static int spawn(uint32_t stream, struct spec *s)
{
    struct proc *p = NULL;
    for (int i = 0; i < MAX_PROCS; i++) if (!procs[i].pid) { p = &procs[i]; break; }
    if (!p) { put(T_ERROR, stream, "too many processes", 18); return -1; }
    if (!s->argc) { put(T_ERROR, stream, "no command", 10); return -1; }
    int in[2] = {-1, -1}, out[2] = {-1, -1}, err[2] = {-1, -1}, master = -1;
    char slave[64] = "";
    if (s->tty) {
        master = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
        if (master < 0 || grantpt(master) || unlockpt(master) || ptsname_r(master, slave, sizeof slave)) {
            error_to(stream, "allocating a terminal", errno);
            if (master >= 0) close(master);
            return -1;
        }
        struct winsize ws = { .ws_row = s->rows, .ws_col = s->cols };
        ioctl(master, TIOCSWINSZ, &ws);
    } else if (pipe2(in, O_CLOEXEC) || pipe2(out, O_CLOEXEC) || pipe2(err, O_CLOEXEC)) {
        error_to(stream, "making pipes", errno);
        return -1;
    }
    pid_t pid = fork();
    if (pid < 0) { error_to(stream, "fork", errno); return -1; }
    if (pid == 0) {
        sigset_t none; sigemptyset(&none); sigprocmask(SIG_SETMASK, &none, NULL);
        signal(SIGPIPE, SIG_DFL);
        setsid();
        if (s->tty) {
            int fd = open(slave, O_RDWR);
            if (fd < 0) _exit(126);
            ioctl(fd, TIOCSCTTY, 0);
            dup2(fd, 0); dup2(fd, 1); dup2(fd, 2);
            if (fd > 2) close(fd);
        } else {
            dup2(in[0], 0); dup2(out[1], 1); dup2(err[1], 2);
        }
        write_file(CGROUP "/cgroup.procs", "0");
        if (chroot(root) || chdir(s->cwd)) {
            dprintf(2, "cairn: cannot enter %s: %s\n", s->cwd, strerror(errno));
            _exit(126);
        }
        extern char **environ;
        environ = s->envp;
        execvp(s->argv[0], s->argv);
        dprintf(2, "cairn: %s: %s\n", s->argv[0], strerror(errno));
        _exit(errno == ENOENT ? 127 : 126);
    }
    memset(p, 0, sizeof *p);
    p->stream = stream; p->pid = pid; p->tty = s->tty;
    if (s->tty) { p->in = p->out = master; p->err = -1; nonblock(master); }
    else {
        close(in[0]); close(out[1]); close(err[1]);
        p->in = in[1]; p->out = out[0]; p->err = err[0];
        nonblock(p->in); nonblock(p->out); nonblock(p->err);
    }
    putf(T_STARTED, stream, "%ld", pid);
    return 0;
}

static void close_fd(struct proc *p, int *fd)
{
    if (*fd < 0) return;
    int f = *fd;
    if (p->in == f) p->in = -1;
    if (p->out == f) p->out = -1;
    if (p->err == f) p->err = -1;
    close(f);
}

/* Read what a child wrote; returns 0 at EOF */
static int pump(struct proc *p, int *fd, uint8_t type)
{
    char b[16384];
    ssize_t n = read(*fd, b, sizeof b);
    if (n > 0) { put(type, p->stream, b, n); return 1; }
    if (n < 0 && errno == EAGAIN) return 1;
    close_fd(p, fd);  /* EOF, or EIO from a tty whose last slave closed */
    return 0;
}

static void finish(struct proc *p)
{
    /* what the process wrote before it exited is in the pipes: send it first */
    while (p->out >= 0) {
        struct pollfd q = { .fd = p->out, .events = POLLIN };
        if (poll(&q, 1, 0) <= 0 || !pump(p, &p->out, T_STDOUT)) break;
    }
    while (p->err >= 0) {
        struct pollfd q = { .fd = p->err, .events = POLLIN };
        if (poll(&q, 1, 0) <= 0 || !pump(p, &p->err, T_STDERR)) break;
    }
    int code = WIFEXITED(p->status) ? WEXITSTATUS(p->status) : 128 + WTERMSIG(p->status);
    putf(T_EXIT, p->stream, "%ld", code);
    if (p->in >= 0) close_fd(p, &p->in);
    if (p->out >= 0) close_fd(p, &p->out);
    if (p->err >= 0) close_fd(p, &p->err);
    free(p->inbuf);
    if (p->stream == 1) { main_done = 1; clock_gettime(CLOCK_MONOTONIC, &main_done_at); }
    memset(p, 0, sizeof *p);
    p->in = p->out = p->err = -1;
}

static void reap(void)
{
    int status;
    pid_t pid;
    while ((pid = waitpid(-1, &status, WNOHANG)) > 0)
        for (int i = 0; i < MAX_PROCS; i++)
            if (procs[i].pid == pid) { procs[i].exited = 1; procs[i].status = status; finish(&procs[i]); }
}

static void feed_stdin(struct proc *p)
{
    while (p->inlen && p->in >= 0) {
        ssize_t n = write(p->in, p->inbuf, p->inlen);
        if (n < 0) { if (errno != EAGAIN) { p->inlen = 0; } return; }
        memmove(p->inbuf, p->inbuf + n, p->inlen - n);
        p->inlen -= n;
    }
    if (!p->inlen && p->in_eof && p->in >= 0 && !p->tty) close_fd(p, &p->in);
}

/* --- the container's setup (CONFIG) ----------------------------------------------------- */

static long cfg_mem, cfg_cpu, cfg_pids;
static const char *cfg_hostname;

static void config_extra(const char *kv)
{
    if (!strncmp(kv, "mem=", 4)) cfg_mem = atol(kv + 4);
    else if (!strncmp(kv, "cpu=", 4)) cfg_cpu = atol(kv + 4);
    else if (!strncmp(kv, "pids=", 5)) cfg_pids = atol(kv + 5);
    else if (!strncmp(kv, "hostname=", 9)) cfg_hostname = kv + 9;
    else if (!strncmp(kv, "mount=", 6) && nmounts < MAX_MOUNTS) snprintf(mounts[nmounts++], 600, "%.500s", kv + 6);
}

/* "/dev/<entry>" of the entry of sysfs directory `dir` whose file `leaf` reads `want` */
static int sysfs_dev(const char *dir, const char *leaf, const char *want, char *dev, size_t len)
{
    DIR *d = opendir(dir);
    struct dirent *e;
    int found = -1;
    while (d && found < 0 && (e = readdir(d))) {
        char path[300], buf[64] = "";
        snprintf(path, sizeof path, "%s/%.100s/%s", dir, e->d_name, leaf);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0) continue;
        ssize_t n = read(fd, buf, sizeof buf - 1);
        close(fd);
        if (n > 0) { buf[n] = 0; buf[strcspn(buf, "\n")] = 0; }
        if (!strcmp(buf, want)) { snprintf(dev, len, "/dev/%.250s", e->d_name); found = 0; }
    }
    if (d) closedir(d);
    return found;
}

/* /dev/vdX whose virtio serial is `serial` */
static int disk_of(const char *serial, char *dev, size_t len)
{
    return sysfs_dev("/sys/block", "serial", serial, dev, len);
}

static int mkdirs(const char *path)
{
    char b[512];
    snprintf(b, sizeof b, "%s", path);
    for (char *s = b + 1; *s; s++)
        if (*s == '/') { *s = 0; mkdir(b, 0755); *s = '/'; }
    return mkdir(b, 0755) && errno != EEXIST ? -1 : 0;
}

static int mount_volumes(uint32_t stream)
{
    for (int i = 0; i < nmounts; i++) {
        /* SERIAL:FS:ro|rw:PATH */
        char spec[600], dev[300], target[600];
        snprintf(spec, sizeof spec, "%s", mounts[i]);
        char *serial = spec, *fs = strchr(serial, ':'), *mode, *path;
        if (!fs || !(mode = strchr(fs + 1, ':')) || !(path = strchr(mode + 1, ':'))) {
            put(T_ERROR, stream, "bad mount", 9); return -1;
        }
        *fs++ = 0; *mode++ = 0; *path++ = 0;
        if (strstr(path, "..") || path[0] != '/') { put(T_ERROR, stream, "bad mount path", 14); return -1; }
        if (!strcmp(fs, "xfs")) {
            /* loaded on demand: most containers never pay for it */
            int m = open("/lib/modules/libcrc32c.ko", O_RDONLY | O_CLOEXEC);
            if (m >= 0) { syscall(SYS_finit_module, m, "", 0); close(m); }
            m = open("/lib/modules/xfs.ko", O_RDONLY | O_CLOEXEC);
            if (m >= 0) { syscall(SYS_finit_module, m, "", 0); close(m); }
        }
        int tries = 0;
        while (disk_of(serial, dev, sizeof dev) && tries++ < 50) usleep(100000);
        if (tries > 50) { error_to(stream, serial, ENODEV); return -1; }
        snprintf(target, sizeof target, "%.80s%.500s", root, path);
        if (mkdirs(target)) { error_to(stream, target, errno); return -1; }
        if (mount(dev, target, fs, strcmp(mode, "ro") ? 0 : MS_RDONLY, NULL)) {
            char what[400];
            snprintf(what, sizeof what, "mounting volume %s (%s) at %s", serial, fs, path);
            error_to(stream, what, errno);
            return -1;
        }
        snprintf(mounts[i], 600, "%s", target);  /* from now on: what to unmount */
    }
    return 0;
}

static void limits(void)
{
    char b[64];
    mkdir(CGROUP, 0755);
    /* one at a time: a controller the kernel lacks must not cost the others */
    write_file("/sys/fs/cgroup/cgroup.subtree_control", "+memory");
    write_file("/sys/fs/cgroup/cgroup.subtree_control", "+cpu");
    write_file("/sys/fs/cgroup/cgroup.subtree_control", "+pids");
    if (cfg_mem > 0) { snprintf(b, sizeof b, "%ld", cfg_mem); write_file(CGROUP "/memory.max", b);
                       write_file(CGROUP "/memory.swap.max", "0"); }
    if (cfg_cpu > 0) { snprintf(b, sizeof b, "%ld 100000", cfg_cpu); write_file(CGROUP "/cpu.max", b); }
    if (cfg_pids > 0) { snprintf(b, sizeof b, "%ld", cfg_pids); write_file(CGROUP "/pids.max", b); }
}

static void config(char *payload, size_t len)
{
    if (main_started) return;  /* one main process per boot */
    struct spec s;
    nmounts = 0;
    parse_spec(payload, len, &s, config_extra);
    main_started = 1;
    if (cfg_hostname) sethostname(cfg_hostname, strlen(cfg_hostname));
    limits();
    if (mount_volumes(1) || spawn(1, &s)) { main_done = 1; clock_gettime(CLOCK_MONOTONIC, &main_done_at); }
}

static void poweroff(void)
{
    sync();
    for (int i = nmounts - 1; i >= 0; i--) umount2(mounts[i], 0);
    sync();
    reboot(RB_POWER_OFF);
    _exit(0);
}

/* --- frames from the host --------------------------------------------------------------- */

static void frame(uint8_t type, uint32_t stream, char *payload, size_t len)
{
    struct proc *p = find(stream);
    switch (type) {
    case T_HELLO: {
        char b[64];
        size_t n = len > 32 ? 32 : len;
        memcpy(b, payload, n);
        n += snprintf(b + n, sizeof b - n, "started=%d", main_started);
        put(T_READY, 0, b, n);
        break;
    }
    case T_CONFIG: config(payload, len); break;
    case T_EXEC: {
        if (p || stream < 2) { put(T_ERROR, stream, "stream in use", 13); break; }
        struct spec s;
        parse_spec(payload, len, &s, NULL);
        spawn(stream, &s);
        break;
    }
    case T_STDIN:
        if (p && p->in >= 0 && p->inlen + len <= MAX_IN) {
            char *b = realloc(p->inbuf, p->inlen + len);
            if (b) { memcpy(b + p->inlen, payload, len); p->inbuf = b; p->inlen += len; feed_stdin(p); }
        }
        break;
    case T_EOF:
        if (p) { p->in_eof = 1; if (p->tty) { char eot = 4; write(p->in, &eot, 1); } feed_stdin(p); }
        break;
    case T_RESIZE:
        if (p && p->tty) {
            char b[32] = ""; memcpy(b, payload, len < 31 ? len : 31);
            struct winsize ws = {0};
            if (sscanf(b, "%hu %hu", &ws.ws_row, &ws.ws_col) == 2) ioctl(p->in, TIOCSWINSZ, &ws);
        }
        break;
    case T_SIGNAL:
        if (p) { char b[16] = ""; memcpy(b, payload, len < 15 ? len : 15); kill(p->pid, atoi(b)); }
        break;
    case T_CLOSE:
        if (p) kill(-p->pid, SIGKILL);
        break;
    }
}

static void parse_input(void)
{
    size_t at = 0;
    while (inblen - at >= HDR) {
        unsigned char *h = inb + at;
        if (h[0] != 0xCA || h[1] != 0x1F) { at++; continue; }  /* resynchronise */
        uint32_t stream = (uint32_t)h[3] << 24 | h[4] << 16 | h[5] << 8 | h[6];
        uint32_t len = (uint32_t)h[7] << 24 | h[8] << 16 | h[9] << 8 | h[10];
        if (len > MAX_IN || h[2] == 0 || h[2] > T_CLOSE) { at++; continue; }
        if (inblen - at < HDR + len) break;
        frame(h[2], stream, (char *)h + HDR, len);
        at += HDR + len;
    }
    memmove(inb, inb + at, inblen - at);
    inblen -= at;
}

static int open_port(void)
{
    char dev[300];
    if (sysfs_dev("/sys/class/virtio-ports", "name", PORT_NAME, dev, sizeof dev)) return -1;
    return open(dev, O_RDWR | O_NONBLOCK | O_CLOEXEC);
}

int main(int argc, char **argv)
{
    if (argc > 1) root = argv[1];
    for (int i = 0; i < MAX_PROCS; i++) procs[i].in = procs[i].out = procs[i].err = -1;
    for (int i = 0; i < 100 && (port = open_port()) < 0; i++) usleep(50000);
    if (port < 0) { say("CAIRN-AGENT-NO-PORT %s\n", PORT_NAME); sleep(2); reboot(RB_POWER_OFF); }
    sigset_t mask; sigemptyset(&mask); sigaddset(&mask, SIGCHLD);
    sigprocmask(SIG_BLOCK, &mask, NULL);
    int sfd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);
    signal(SIGPIPE, SIG_IGN);
    inb = malloc(MAX_IN + HDR + 65536);
    say("CAIRN-AGENT-UP %s\n", root);
    for (;;) {
        struct pollfd fds[2 + 3 * MAX_PROCS];
        struct proc *owner[2 + 3 * MAX_PROCS];
        int kind[2 + 3 * MAX_PROCS];
        int n = 0;
        fds[n] = (struct pollfd){ .fd = sfd, .events = POLLIN }; owner[n] = NULL; kind[n++] = 0;
        fds[n] = (struct pollfd){ .fd = port, .events = POLLIN | (outlen ? POLLOUT : 0) }; owner[n] = NULL; kind[n++] = 1;
        for (int i = 0; i < MAX_PROCS; i++) {
            struct proc *p = &procs[i];
            if (!p->pid) continue;
            if (p->out >= 0 && outlen < OUT_HIGH) {
                fds[n] = (struct pollfd){ .fd = p->out, .events = POLLIN }; owner[n] = p; kind[n++] = 2;
            }
            if (p->err >= 0 && outlen < OUT_HIGH) {
                fds[n] = (struct pollfd){ .fd = p->err, .events = POLLIN }; owner[n] = p; kind[n++] = 3;
            }
            if (p->inlen && p->in >= 0 && !p->tty) {
                fds[n] = (struct pollfd){ .fd = p->in, .events = POLLOUT }; owner[n] = p; kind[n++] = 4;
            }
        }
        /* disconnected, the port polls readable at once (EOF): check it every 100 ms */
        int timeout = connected ? (main_done ? 100 : -1) : 100;
        if (!connected) fds[1].fd = -1;  /* poll ignores it */
        if (poll(fds, n, timeout) < 0 && errno != EINTR) continue;
        if (!connected) {
            struct pollfd q = { .fd = port, .events = POLLIN };
            if (poll(&q, 1, 0) >= 0 && !(q.revents & POLLHUP)) { connected = 1; inblen = 0; }
        }
        for (int i = 0; i < n; i++) {
            if (!fds[i].revents) continue;
            struct proc *p = owner[i];
            if (kind[i] == 0) {
                struct signalfd_siginfo si;
                while (read(sfd, &si, sizeof si) > 0) {}
                reap();
            } else if (kind[i] == 1 && connected) {
                if (fds[i].revents & POLLIN) {
                    ssize_t r = read(port, inb + inblen, MAX_IN + HDR + 65536 - inblen);
                    if (r > 0) { inblen += r; parse_input(); if (inblen >= MAX_IN + HDR) inblen = 0; }
                    else if (r == 0) { connected = 0; inblen = 0; }  /* the host went away */
                } else if (fds[i].revents & POLLHUP) { connected = 0; inblen = 0; }
            } else if (p && p->pid) {
                if (kind[i] == 2 && p->out == fds[i].fd) pump(p, &p->out, T_STDOUT);
                else if (kind[i] == 3 && p->err == fds[i].fd) pump(p, &p->err, T_STDERR);
                else if (kind[i] == 4) feed_stdin(p);
            }
        }
        for (int i = 0; i < MAX_PROCS; i++) if (procs[i].pid && procs[i].inlen) feed_stdin(&procs[i]);
        flush_out();
        if (main_done) {
            struct timespec now;
            clock_gettime(CLOCK_MONOTONIC, &now);
            /* the main process is gone: its last words reach the host (or 3 s pass), then power off */
            if (!outlen || now.tv_sec - main_done_at.tv_sec >= 3) poweroff();
        }
    }
}
