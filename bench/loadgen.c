/*
 * loadgen: closed-loop UDP load generator for the udptime benchmark.
 *
 * K sockets each keep W requests in flight: every reply is answered with a
 * new request; a socket that hears nothing for --timeout-ms has its
 * outstanding requests counted as lost and is refilled to W. Datagrams go
 * out with sendmmsg and come back with recvmmsg, sockets watched by epoll.
 *
 * Round-trip times are matched first-in first-out per socket (replies to a
 * text format carry nothing to match on; loopback keeps order), recorded in
 * a 100 ns histogram. --latency is K=1, W=1: one request at a time.
 * --rate caps the total request rate (token bucket) for "half load" runs.
 *
 * Source addresses, so that a per-source rate limiter is never what is
 * measured: --spread binds socket i to SOURCE_BASE + i (K sources);
 * --sources N sends request j from SOURCE_BASE + (j mod N) via IP_PKTINFO on
 * unconnected sockets (N sources, e.g. 32768, each at a trickle). Without
 * either, everything comes from 127.0.0.1.
 *
 * --payload-file PATH sends prepared datagrams instead (e.g. NTS-authenticated
 * NTP requests, which a closed loop cannot make fast enough itself): the file
 * holds records of a 2-byte big-endian length followed by that many bytes,
 * and requests cycle through them in order. Replies are still checked as
 * --payload says (ntp: at least 48 bytes, mode 4; stratum 0 counts as a KoD,
 * of which an NTS NAK, refid NTSN, is also counted apart); any reply length
 * is accepted (NTS replies carry extension fields).
 *
 * Only loopback (127.0.0.0/8) targets are accepted. Prints one JSON object.
 *
 * Build: cc -O2 -o loadgen loadgen.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BATCH 64
#define REPLY_MAX 4096 /* longer replies arrive truncated, still counted */
#define DGRAM_MAX 65507
#define NTP_LEN 48
#define NTP_UNIX_OFFSET 2208988800ULL
#define HIST_NS 100            /* histogram bucket width */
#define HIST_BUCKETS 2000000   /* 100 ns * 2e6 = 200 ms */
#define MAX_SOCKETS 4096
#define MAX_WINDOW 4096

enum payload { PAYLOAD_EMPTY, PAYLOAD_NTP };

struct sock {
    int fd;
    int outstanding;
    uint64_t last_progress_ns;
    uint64_t *fifo; /* send times of outstanding requests, ring of size W */
    int head;
    int count;
};

/* Prepared request datagrams (--payload-file), sent in turn. */
struct dgram {
    const unsigned char *data;
    size_t len;
};

static volatile sig_atomic_t stop_flag;

static void on_signal(int sig) {
    (void)sig;
    stop_flag = 1;
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static void usage(const char *prog) {
    fprintf(stderr,
            "usage: %s --port P [--host 127.0.0.1] [--payload empty|ntp]\n"
            "          [--sockets K] [--window W] [--duration S] [--warmup S]\n"
            "          [--timeout-ms MS] [--rate R] [--spread | --sources N]\n"
            "          [--source-base 127.1.0.1] [--payload-file PATH]\n"
            "          [--latency]\n",
            prog);
}

/* Counters of the measured interval (after warm-up). */
static uint64_t c_sent, c_replies, c_lost, c_refills, c_send_errors, c_bad, c_kod;
static uint64_t c_nak, c_sent_bytes, c_reply_bytes;
static uint64_t *hist;
static uint64_t hist_over, hist_n;
static double hist_sum_ns;
static uint64_t hist_max_ns;

static void hist_add(uint64_t ns) {
    uint64_t b = ns / HIST_NS;
    if (b >= HIST_BUCKETS)
        hist_over++;
    else
        hist[b]++;
    hist_n++;
    hist_sum_ns += (double)ns;
    if (ns > hist_max_ns)
        hist_max_ns = ns;
}

static double hist_pct(double p) {
    if (hist_n == 0)
        return -1.0;
    uint64_t want = (uint64_t)ceil(p * (double)hist_n);
    if (want < 1)
        want = 1;
    uint64_t acc = 0;
    for (uint64_t b = 0; b < HIST_BUCKETS; b++) {
        acc += hist[b];
        if (acc >= want)
            return ((double)b + 0.5) * HIST_NS / 1000.0;
    }
    return (double)hist_max_ns / 1000.0;
}

static void fill_ntp(unsigned char *buf, uint32_t seq) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    memset(buf, 0, NTP_LEN);
    buf[0] = (0 << 6) | (4 << 3) | 3; /* LI 0, VN 4, mode 3 (client) */
    buf[2] = 6;                       /* poll */
    buf[3] = (unsigned char)0xEC;     /* precision -20 */
    uint32_t sec = (uint32_t)((uint64_t)ts.tv_sec + NTP_UNIX_OFFSET);
    uint32_t frac = (uint32_t)(((uint64_t)ts.tv_nsec << 32) / 1000000000ULL);
    frac = (frac & ~0xFFFu) | (seq & 0xFFFu); /* unique per request */
    uint32_t nsec = htonl(sec), nfrac = htonl(frac);
    memcpy(buf + 40, &nsec, 4);
    memcpy(buf + 44, &nfrac, 4);
}

/* Read --payload-file: records of a 2-byte big-endian length and the bytes.
 * Returns the number of datagrams (> 0), or -1 after printing why not. */
static int load_payload_file(const char *path, struct dgram **out) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "loadgen: %s: %s\n", path, strerror(errno));
        return -1;
    }
    size_t cap = 1 << 16, size = 0;
    unsigned char *buf = malloc(cap);
    for (;;) {
        if (!buf) {
            fprintf(stderr, "loadgen: out of memory reading %s\n", path);
            fclose(f);
            return -1;
        }
        size += fread(buf + size, 1, cap - size, f);
        if (size < cap)
            break;
        cap *= 2;
        buf = realloc(buf, cap);
    }
    int failed = ferror(f);
    fclose(f);
    if (failed) {
        fprintf(stderr, "loadgen: reading %s failed\n", path);
        return -1;
    }
    int n = 0;
    for (size_t off = 0; off < size; n++) {
        size_t len = off + 2 <= size ? ((size_t)buf[off] << 8) | buf[off + 1] : SIZE_MAX;
        if (len > DGRAM_MAX || off + 2 + len > size) {
            fprintf(stderr, "loadgen: %s: bad record at byte %zu\n", path, off);
            return -1;
        }
        off += 2 + len;
    }
    if (n == 0) {
        fprintf(stderr, "loadgen: %s holds no datagrams\n", path);
        return -1;
    }
    struct dgram *d = calloc((size_t)n, sizeof *d);
    if (!d) {
        perror("calloc");
        return -1;
    }
    size_t off = 0;
    for (int i = 0; i < n; i++) {
        d[i].len = ((size_t)buf[off] << 8) | buf[off + 1];
        d[i].data = buf + off + 2;
        off += 2 + d[i].len;
    }
    *out = d;
    return n;
}

/* Address an unconnected send to target from source address src (host order). */
static void set_source(struct msghdr *h, struct sockaddr_in *target, char *ctl,
                       uint32_t src) {
    h->msg_name = target;
    h->msg_namelen = sizeof *target;
    h->msg_control = ctl;
    h->msg_controllen = CMSG_SPACE(sizeof(struct in_pktinfo));
    struct cmsghdr *cm = CMSG_FIRSTHDR(h);
    cm->cmsg_level = IPPROTO_IP;
    cm->cmsg_type = IP_PKTINFO;
    cm->cmsg_len = CMSG_LEN(sizeof(struct in_pktinfo));
    struct in_pktinfo pi;
    memset(&pi, 0, sizeof pi);
    pi.ipi_spec_dst.s_addr = htonl(src);
    memcpy(CMSG_DATA(cm), &pi, sizeof pi);
}

int main(int argc, char **argv) {
    const char *host = "127.0.0.1";
    const char *source_base = "127.1.0.1";
    int port = 0, nsock = 16, window = 8, spread = 0, latency = 0, nsources = 0;
    double duration = 5.0, warmup = 0.5, rate = 0.0;
    int timeout_ms = 100;
    enum payload payload = PAYLOAD_EMPTY;
    const char *payload_file = NULL;

    static const struct option opts[] = {
        {"host", required_argument, 0, 'h'},
        {"port", required_argument, 0, 'p'},
        {"payload", required_argument, 0, 'P'},
        {"sockets", required_argument, 0, 'k'},
        {"window", required_argument, 0, 'w'},
        {"duration", required_argument, 0, 'd'},
        {"warmup", required_argument, 0, 'W'},
        {"timeout-ms", required_argument, 0, 't'},
        {"rate", required_argument, 0, 'r'},
        {"spread", no_argument, 0, 's'},
        {"sources", required_argument, 0, 'S'},
        {"source-base", required_argument, 0, 'b'},
        {"latency", no_argument, 0, 'l'},
        {"payload-file", required_argument, 0, 'f'},
        {"help", no_argument, 0, '?'},
        {0, 0, 0, 0},
    };
    int c;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (c) {
        case 'h': host = optarg; break;
        case 'p': port = atoi(optarg); break;
        case 'P':
            if (strcmp(optarg, "empty") == 0)
                payload = PAYLOAD_EMPTY;
            else if (strcmp(optarg, "ntp") == 0)
                payload = PAYLOAD_NTP;
            else {
                fprintf(stderr, "loadgen: unknown payload %s\n", optarg);
                return 2;
            }
            break;
        case 'k': nsock = atoi(optarg); break;
        case 'w': window = atoi(optarg); break;
        case 'd': duration = atof(optarg); break;
        case 'W': warmup = atof(optarg); break;
        case 't': timeout_ms = atoi(optarg); break;
        case 'r': rate = atof(optarg); break;
        case 's': spread = 1; break;
        case 'S': nsources = atoi(optarg); break;
        case 'b': source_base = optarg; break;
        case 'l': latency = 1; break;
        case 'f': payload_file = optarg; break;
        default: usage(argv[0]); return 2;
        }
    }
    if (latency) {
        nsock = 1;
        window = 1;
    }
    if (port <= 0 || port > 65535 || nsock < 1 || nsock > MAX_SOCKETS || window < 1 ||
        window > MAX_WINDOW || duration <= 0 || warmup < 0 || timeout_ms < 1 ||
        nsources < 0 || nsources > (1 << 22) || (spread && nsources)) {
        usage(argv[0]);
        return 2;
    }

    struct sockaddr_in target;
    memset(&target, 0, sizeof target);
    target.sin_family = AF_INET;
    target.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, host, &target.sin_addr) != 1) {
        fprintf(stderr, "loadgen: --host must be an IPv4 literal\n");
        return 2;
    }
    if ((ntohl(target.sin_addr.s_addr) >> 24) != 127) {
        fprintf(stderr, "loadgen: refusing non-loopback target %s\n", host);
        return 2;
    }
    struct in_addr base;
    if (inet_pton(AF_INET, source_base, &base) != 1 || (ntohl(base.s_addr) >> 24) != 127) {
        fprintf(stderr, "loadgen: --source-base must be a 127.x.y.z literal\n");
        return 2;
    }

    struct dgram *dgrams = NULL;
    int ndgrams = 0;
    uint32_t dgram_next = 0;
    if (payload_file && (ndgrams = load_payload_file(payload_file, &dgrams)) < 0)
        return 2;

    hist = calloc(HIST_BUCKETS, sizeof *hist);
    struct sock *socks = calloc((size_t)nsock, sizeof *socks);
    if (!hist || !socks) {
        perror("calloc");
        return 1;
    }

    int ep = epoll_create1(0);
    if (ep < 0) {
        perror("epoll_create1");
        return 1;
    }
    for (int i = 0; i < nsock; i++) {
        int fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
        if (fd < 0) {
            perror("socket");
            return 1;
        }
        if (spread) {
            struct sockaddr_in src;
            memset(&src, 0, sizeof src);
            src.sin_family = AF_INET;
            src.sin_addr.s_addr = htonl(ntohl(base.s_addr) + (uint32_t)i);
            if (bind(fd, (struct sockaddr *)&src, sizeof src) < 0) {
                perror("bind source");
                return 1;
            }
        }
        if (!nsources && connect(fd, (struct sockaddr *)&target, sizeof target) < 0) {
            perror("connect");
            return 1;
        }
        socks[i].fd = fd;
        socks[i].fifo = calloc((size_t)window, sizeof(uint64_t));
        if (!socks[i].fifo) {
            perror("calloc");
            return 1;
        }
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0) {
            perror("epoll_ctl");
            return 1;
        }
    }

    signal(SIGINT, on_signal);
    signal(SIGTERM, on_signal);
    signal(SIGPIPE, SIG_IGN);

    /* Per-batch buffers. */
    static unsigned char txbuf[BATCH][NTP_LEN];
    static unsigned char rxbuf[BATCH][REPLY_MAX];
    struct mmsghdr txmsg[BATCH], rxmsg[BATCH];
    struct iovec txiov[BATCH], rxiov[BATCH];
    size_t txlen = payload == PAYLOAD_NTP ? NTP_LEN : 0;
    for (int j = 0; j < BATCH; j++) {
        txiov[j].iov_base = txbuf[j];
        txiov[j].iov_len = txlen;
        rxiov[j].iov_base = rxbuf[j];
        rxiov[j].iov_len = REPLY_MAX;
    }
    uint32_t seq = 0;
    static char txctl[BATCH][CMSG_SPACE(sizeof(struct in_pktinfo))];
    uint32_t src_base = ntohl(base.s_addr), src_next = 0;

    uint64_t t0 = now_ns();
    uint64_t warm_end = t0 + (uint64_t)(warmup * 1e9);
    uint64_t t_end = warm_end + (uint64_t)(duration * 1e9);
    uint64_t timeout_ns = (uint64_t)timeout_ms * 1000000ULL;
    int warm = warmup > 0;
    double tokens = 0.0;
    double burst = rate > 0 ? fmax(1.0, rate * 0.002) : 0.0;
    uint64_t last_token_ns = t0, last_check_ns = t0;
    struct rusage ru0;
    getrusage(RUSAGE_SELF, &ru0);

    /* Send up to `want` new requests on socket s; returns how many went out. */
#define TOP_UP(S, NOW)                                                              \
    do {                                                                            \
        struct sock *s_ = (S);                                                      \
        int want_ = window - s_->outstanding;                                       \
        if (rate > 0 && want_ > (int)tokens)                                        \
            want_ = (int)tokens;                                                    \
        while (want_ > 0) {                                                         \
            int n_ = want_ > BATCH ? BATCH : want_;                                 \
            for (int j_ = 0; j_ < n_; j_++) {                                       \
                if (ndgrams) {                                                      \
                    struct dgram *d_ = &dgrams[dgram_next++ % (uint32_t)ndgrams];   \
                    txiov[j_].iov_base = (void *)d_->data;                          \
                    txiov[j_].iov_len = d_->len;                                    \
                } else if (payload == PAYLOAD_NTP)                                  \
                    fill_ntp(txbuf[j_], seq++);                                     \
                memset(&txmsg[j_], 0, sizeof txmsg[j_]);                            \
                txmsg[j_].msg_hdr.msg_iov = &txiov[j_];                             \
                txmsg[j_].msg_hdr.msg_iovlen = 1;                                   \
                if (nsources)                                                       \
                    set_source(&txmsg[j_].msg_hdr, &target, txctl[j_],              \
                               src_base + (src_next++ % (uint32_t)nsources));       \
            }                                                                       \
            int r_ = sendmmsg(s_->fd, txmsg, (unsigned)n_, 0);                      \
            if (r_ <= 0) {                                                          \
                c_send_errors++;                                                    \
                break;                                                              \
            }                                                                       \
            for (int j_ = 0; j_ < r_; j_++) {                                       \
                s_->fifo[(s_->head + s_->count) % window] = (NOW);                  \
                s_->count++;                                                        \
                c_sent_bytes += txiov[j_].iov_len;                                  \
            }                                                                       \
            s_->outstanding += r_;                                                  \
            c_sent += (uint64_t)r_;                                                 \
            if (rate > 0)                                                           \
                tokens -= r_;                                                       \
            want_ -= r_;                                                            \
            if (r_ < n_) {                                                          \
                c_send_errors++;                                                    \
                break;                                                              \
            }                                                                       \
        }                                                                           \
    } while (0)

    for (int i = 0; i < nsock; i++) {
        socks[i].last_progress_ns = t0;
        if (rate <= 0)
            TOP_UP(&socks[i], t0);
    }

    struct epoll_event events[256];
    uint64_t now = t0;
    while (!stop_flag) {
        int to = rate > 0 ? 1 : 5;
        int nev = epoll_wait(ep, events, 256, to);
        if (nev < 0 && errno != EINTR) {
            perror("epoll_wait");
            break;
        }
        now = now_ns();
        if (now >= t_end)
            break;
        if (warm && now >= warm_end) {
            /* Start of the measured interval: forget the warm-up. */
            warm = 0;
            c_sent = c_replies = c_lost = c_refills = c_send_errors = c_bad = c_kod = 0;
            c_nak = c_sent_bytes = c_reply_bytes = 0;
            memset(hist, 0, HIST_BUCKETS * sizeof *hist);
            hist_over = hist_n = hist_max_ns = 0;
            hist_sum_ns = 0;
            getrusage(RUSAGE_SELF, &ru0);
        }
        if (rate > 0) {
            tokens += rate * (double)(now - last_token_ns) / 1e9;
            if (tokens > burst)
                tokens = burst;
            last_token_ns = now;
        }
        for (int e = 0; e < nev; e++) {
            struct sock *s = &socks[events[e].data.u32];
            for (;;) {
                for (int j = 0; j < BATCH; j++) {
                    memset(&rxmsg[j], 0, sizeof rxmsg[j]);
                    rxmsg[j].msg_hdr.msg_iov = &rxiov[j];
                    rxmsg[j].msg_hdr.msg_iovlen = 1;
                }
                int r = recvmmsg(s->fd, rxmsg, BATCH, MSG_DONTWAIT, NULL);
                if (r <= 0)
                    break; /* EAGAIN, or ECONNREFUSED from an ICMP error */
                for (int j = 0; j < r; j++) {
                    unsigned len = rxmsg[j].msg_len;
                    c_reply_bytes += len;
                    if (payload == PAYLOAD_NTP) {
                        if (len < NTP_LEN || (rxbuf[j][0] & 7) != 4)
                            c_bad++;
                        else if (rxbuf[j][1] == 0) {
                            c_kod++;
                            if (memcmp(rxbuf[j] + 12, "NTSN", 4) == 0)
                                c_nak++;
                        }
                    } else if (len == 0) {
                        c_bad++;
                    }
                    if (s->count > 0) {
                        hist_add(now - s->fifo[s->head]);
                        s->head = (s->head + 1) % window;
                        s->count--;
                    }
                }
                c_replies += (uint64_t)r;
                s->outstanding -= r;
                if (s->outstanding < 0)
                    s->outstanding = 0; /* a late reply after a refill */
                s->last_progress_ns = now;
                if (r < BATCH)
                    break;
            }
            TOP_UP(s, now);
        }
        if (rate > 0 || now - last_check_ns >= 1000000ULL) {
            last_check_ns = now;
            for (int i = 0; i < nsock; i++) {
                struct sock *s = &socks[i];
                if (s->outstanding > 0 && now - s->last_progress_ns >= timeout_ns) {
                    c_lost += (uint64_t)s->outstanding;
                    c_refills++;
                    s->outstanding = 0;
                    s->head = 0;
                    s->count = 0;
                    s->last_progress_ns = now;
                }
                if (s->outstanding < window) {
                    if (s->outstanding == 0)
                        s->last_progress_ns = now;
                    TOP_UP(s, now);
                }
            }
        }
    }

    double measured = warm ? (double)(now - t0) / 1e9 : (double)(now - warm_end) / 1e9;
    if (measured <= 0)
        measured = 1e-9;
    struct rusage ru1;
    getrusage(RUSAGE_SELF, &ru1);
    double cpu_user = (double)(ru1.ru_utime.tv_sec - ru0.ru_utime.tv_sec) +
                      (double)(ru1.ru_utime.tv_usec - ru0.ru_utime.tv_usec) / 1e6;
    double cpu_sys = (double)(ru1.ru_stime.tv_sec - ru0.ru_stime.tv_sec) +
                     (double)(ru1.ru_stime.tv_usec - ru0.ru_stime.tv_usec) / 1e6;

    printf("{\"mode\": \"%s\", \"target\": \"%s:%d\", \"payload\": \"%s\", "
           "\"sockets\": %d, \"window\": %d, \"spread\": %s, \"sources\": %d, "
           "\"rate_cap\": %.1f, "
           "\"timeout_ms\": %d, \"warmup_s\": %.3f, \"duration_s\": %.6f, "
           "\"interrupted\": %s, "
           "\"sent\": %llu, \"replies\": %llu, \"lost\": %llu, \"refills\": %llu, "
           "\"send_errors\": %llu, \"bad_replies\": %llu, \"kod\": %llu, "
           "\"replies_per_s\": %.1f, \"loadgen_cpu_s\": %.3f, ",
           latency ? "latency" : "throughput", host, port,
           payload == PAYLOAD_NTP ? "ntp" : "empty", nsock, window,
           spread ? "true" : "false", nsources, rate, timeout_ms, warmup, measured,
           stop_flag ? "true" : "false", (unsigned long long)c_sent,
           (unsigned long long)c_replies, (unsigned long long)c_lost,
           (unsigned long long)c_refills, (unsigned long long)c_send_errors,
           (unsigned long long)c_bad, (unsigned long long)c_kod,
           (double)c_replies / measured, cpu_user + cpu_sys);
    /* What was sent and what came back; a --payload-file path is printed
     * only when it needs no JSON escaping. */
    int plain_path = payload_file != NULL;
    for (const char *q = payload_file; q && *q; q++)
        if (*q == '"' || *q == '\\' || (unsigned char)*q < 0x20)
            plain_path = 0;
    if (plain_path)
        printf("\"payload_file\": \"%s\", ", payload_file);
    else
        printf("\"payload_file\": %s, ", payload_file ? "\"?\"" : "null");
    printf("\"payload_datagrams\": %d, \"nts_nak\": %llu, "
           "\"request_bytes_mean\": %.1f, \"reply_bytes_mean\": %.1f, ",
           ndgrams, (unsigned long long)c_nak,
           c_sent ? (double)c_sent_bytes / (double)c_sent : 0.0,
           c_replies ? (double)c_reply_bytes / (double)c_replies : 0.0);
    if (hist_n > 0)
        printf("\"rtt_us\": {\"samples\": %llu, \"mean\": %.2f, \"p50\": %.2f, "
               "\"p90\": %.2f, \"p99\": %.2f, \"p999\": %.2f, \"max\": %.2f}}\n",
               (unsigned long long)hist_n, hist_sum_ns / (double)hist_n / 1000.0,
               hist_pct(0.50), hist_pct(0.90), hist_pct(0.99), hist_pct(0.999),
               (double)hist_max_ns / 1000.0);
    else
        printf("\"rtt_us\": null}\n");
    return 0;
}
