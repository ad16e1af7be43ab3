/* rtpgen: a paced G.711-like RTP load generator for bench/bench_relay.py.
 *
 * Usage: rtpgen SECONDS PACKET_BYTES PPS PORT... -- CALL...
 *   PORT  a local UDP port on 127.0.0.1 to bind (the generator's "phones")
 *   CALL  "a_sock:relay_port_a:b_sock:relay_port_b": leg a sends from socket a_sock (an index
 *         into the PORT list) to the relay's port for leg a, leg b likewise; the relay forwards
 *         each leg's packets to the other leg's socket.
 *
 * Every call direction is one RTP stream (SSRC = 2*call + direction) sending PPS packets per
 * second, phases spread evenly over the packet interval like independent phones.  The payload
 * starts with the send time (CLOCK_REALTIME, ns); the receive time is the kernel's
 * SO_TIMESTAMPNS, so transit = time spent in the relay (and the kernel), and the added jitter
 * of a packet is |transit - transit of the stream's previous packet|.
 *
 * Prints one "key value" line per figure at the end.  Written for Linux.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_PACKET 1500
#define BATCH 64
#define HIST_US 200000 /* jitter histogram: 1 us buckets up to 200 ms */
#define TICK_NS 250000 /* pacing granularity: 0.25 ms */

struct stream {
    int sock;                 /* index of the sending socket */
    struct sockaddr_in dest;  /* the relay port it sends to */
    uint16_t seq;
    uint32_t ts;
    int64_t next_ns;          /* when its next packet is due */
    uint64_t sent;
    /* receive side */
    uint64_t received;
    uint32_t highest_seq;     /* extended */
    int seen;
    int64_t last_transit;
    uint64_t gaps;
};

static int64_t now_ns(clockid_t clock) {
    struct timespec t;
    clock_gettime(clock, &t);
    return (int64_t)t.tv_sec * 1000000000LL + t.tv_nsec;
}

static uint32_t *jitter_hist, *transit_hist;
static uint64_t jitter_samples, transit_samples, overflow_jitter;

static void note(uint32_t *hist, uint64_t *count, int64_t us) {
    if (us < 0) us = 0;
    if (us >= HIST_US) us = HIST_US - 1;
    hist[us]++;
    (*count)++;
}

static double percentile(const uint32_t *hist, uint64_t count, double p) {
    if (count == 0) return 0.0;
    uint64_t want = (uint64_t)(p * (double)count), seen = 0;
    for (int i = 0; i < HIST_US; i++) {
        seen += hist[i];
        if (seen > want) return i / 1000.0; /* ms */
    }
    return HIST_US / 1000.0;
}

static void receive_all(int fd, struct stream *streams, int nstreams) {
    static struct mmsghdr msgs[BATCH];
    static struct iovec iov[BATCH];
    static char bufs[BATCH][MAX_PACKET];
    static char ctrl[BATCH][64];
    for (;;) {
        for (int i = 0; i < BATCH; i++) {
            iov[i].iov_base = bufs[i];
            iov[i].iov_len = MAX_PACKET;
            memset(&msgs[i].msg_hdr, 0, sizeof msgs[i].msg_hdr);
            msgs[i].msg_hdr.msg_iov = &iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
            msgs[i].msg_hdr.msg_control = ctrl[i];
            msgs[i].msg_hdr.msg_controllen = sizeof ctrl[i];
        }
        int n = recvmmsg(fd, msgs, BATCH, MSG_DONTWAIT, NULL);
        if (n <= 0) return;
        for (int i = 0; i < n; i++) {
            unsigned char *p = (unsigned char *)bufs[i];
            if (msgs[i].msg_len < 20) continue;
            uint32_t ssrc = ((uint32_t)p[8] << 24) | (p[9] << 16) | (p[10] << 8) | p[11];
            if ((int)ssrc >= nstreams) continue;
            struct stream *s = &streams[ssrc];
            uint16_t seq = (uint16_t)((p[2] << 8) | p[3]);
            int64_t sent;
            memcpy(&sent, p + 12, 8);
            int64_t arrived = 0;
            for (struct cmsghdr *c = CMSG_FIRSTHDR(&msgs[i].msg_hdr); c;
                 c = CMSG_NXTHDR(&msgs[i].msg_hdr, c)) {
                if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SO_TIMESTAMPNS) {
                    struct timespec t;
                    memcpy(&t, CMSG_DATA(c), sizeof t);
                    arrived = (int64_t)t.tv_sec * 1000000000LL + t.tv_nsec;
                }
            }
            if (!arrived) arrived = now_ns(CLOCK_REALTIME);
            int64_t transit = arrived - sent;
            note(transit_hist, &transit_samples, transit / 1000);
            if (s->seen) {
                int64_t d = transit - s->last_transit;
                if (d < 0) d = -d;
                if (d / 1000 >= HIST_US) overflow_jitter++;
                note(jitter_hist, &jitter_samples, d / 1000);
                uint16_t expected = (uint16_t)(s->highest_seq + 1);
                if (seq != expected) s->gaps++;
            }
            s->seen = 1;
            s->highest_seq = seq;
            s->last_transit = transit;
            s->received++;
        }
    }
}

static double cpu_seconds(void) {
    struct rusage u;
    getrusage(RUSAGE_SELF, &u);
    return u.ru_utime.tv_sec + u.ru_utime.tv_usec / 1e6 + u.ru_stime.tv_sec +
           u.ru_stime.tv_usec / 1e6;
}

int main(int argc, char **argv) {
    if (argc < 6) {
        fprintf(stderr, "usage: rtpgen SECONDS PACKET_BYTES PPS PORT... -- CALL...\n");
        return 2;
    }
    double seconds = atof(argv[1]);
    int size = atoi(argv[2]), pps = atoi(argv[3]);
    if (size < 20 || size > MAX_PACKET || pps <= 0) return 2;
    int nsocks = 0, sep = 0;
    for (int i = 4; i < argc; i++)
        if (strcmp(argv[i], "--") == 0) { sep = i; break; }
    if (!sep) return 2;
    nsocks = sep - 4;
    int ncalls = argc - sep - 1, nstreams = 2 * ncalls;
    int *fds = calloc(nsocks, sizeof *fds);
    for (int i = 0; i < nsocks; i++) {
        fds[i] = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
        int big = 8 << 20, on = 1;
        setsockopt(fds[i], SOL_SOCKET, SO_RCVBUFFORCE, &big, sizeof big);
        setsockopt(fds[i], SOL_SOCKET, SO_SNDBUFFORCE, &big, sizeof big);
        setsockopt(fds[i], SOL_SOCKET, SO_TIMESTAMPNS, &on, sizeof on);
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[4 + i]))};
        inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
        if (bind(fds[i], (struct sockaddr *)&a, sizeof a) != 0) {
            perror("bind");
            return 1;
        }
    }
    struct stream *streams = calloc(nstreams, sizeof *streams);
    int64_t interval = 1000000000LL / pps, start = now_ns(CLOCK_MONOTONIC) + 20000000LL;
    for (int c = 0; c < ncalls; c++) {
        int a_sock, a_port, b_sock, b_port;
        if (sscanf(argv[sep + 1 + c], "%d:%d:%d:%d", &a_sock, &a_port, &b_sock, &b_port) != 4 ||
            a_sock >= nsocks || b_sock >= nsocks)
            return 2;
        int socks[2] = {a_sock, b_sock}, ports[2] = {a_port, b_port};
        for (int d = 0; d < 2; d++) {
            struct stream *s = &streams[2 * c + d];
            s->sock = socks[d];
            s->dest.sin_family = AF_INET;
            s->dest.sin_port = htons(ports[d]);
            inet_pton(AF_INET, "127.0.0.1", &s->dest.sin_addr);
            s->seq = (uint16_t)(c * 7919 + d);
            s->next_ns = start + interval * (2 * c + d) / nstreams;
        }
    }
    jitter_hist = calloc(HIST_US, sizeof *jitter_hist);
    transit_hist = calloc(HIST_US, sizeof *transit_hist);
    unsigned char packet[MAX_PACKET];
    memset(packet, 0xd5, sizeof packet); /* PCMA silence */
    int64_t end = start + (int64_t)(seconds * 1e9);
    double cpu0 = cpu_seconds();
    uint64_t send_errors = 0;
    int next = 0; /* streams are due in index order, round after round */
    for (;;) {
        int64_t now = now_ns(CLOCK_MONOTONIC);
        if (now >= end) break;
        while (streams[next].next_ns <= now) {
            struct stream *s = &streams[next];
            packet[0] = 0x80;
            packet[1] = 8; /* PCMA */
            packet[2] = s->seq >> 8;
            packet[3] = s->seq & 0xff;
            uint32_t ts = s->ts, ssrc = (uint32_t)next;
            packet[4] = ts >> 24; packet[5] = ts >> 16; packet[6] = ts >> 8; packet[7] = ts;
            packet[8] = ssrc >> 24; packet[9] = ssrc >> 16; packet[10] = ssrc >> 8; packet[11] = ssrc;
            int64_t stamp = now_ns(CLOCK_REALTIME);
            memcpy(packet + 12, &stamp, 8);
            if (sendto(fds[s->sock], packet, size, 0, (struct sockaddr *)&s->dest,
                       sizeof s->dest) != size)
                send_errors++;
            s->sent++;
            s->seq++;
            s->ts += 8000 / pps;
            s->next_ns += interval;
            next = (next + 1) % nstreams;
        }
        for (int i = 0; i < nsocks; i++) receive_all(fds[i], streams, nstreams);
        struct timespec pause = {0, TICK_NS};
        nanosleep(&pause, NULL);
    }
    double cpu_run = cpu_seconds() - cpu0;
    /* stragglers: packets still in the relay when sending stopped */
    int64_t drain_until = now_ns(CLOCK_MONOTONIC) + 500000000LL;
    while (now_ns(CLOCK_MONOTONIC) < drain_until) {
        for (int i = 0; i < nsocks; i++) receive_all(fds[i], streams, nstreams);
        struct timespec pause = {0, 1000000};
        nanosleep(&pause, NULL);
    }
    uint64_t sent = 0, received = 0, gaps = 0, silent = 0;
    for (int i = 0; i < nstreams; i++) {
        sent += streams[i].sent;
        received += streams[i].received;
        gaps += streams[i].gaps;
        if (!streams[i].received) silent++;
    }
    printf("streams %d\nsent %llu\nreceived %llu\nlost %lld\nseq_gaps %llu\nsilent_streams %llu\n",
           nstreams, (unsigned long long)sent, (unsigned long long)received,
           (long long)(sent - received), (unsigned long long)gaps, (unsigned long long)silent);
    printf("send_errors %llu\ncpu_seconds %.3f\nrun_seconds %.3f\n",
           (unsigned long long)send_errors, cpu_run, seconds);
    printf("jitter_p50_ms %.3f\njitter_p99_ms %.3f\njitter_p999_ms %.3f\n",
           percentile(jitter_hist, jitter_samples, 0.50),
           percentile(jitter_hist, jitter_samples, 0.99),
           percentile(jitter_hist, jitter_samples, 0.999));
    printf("transit_p50_ms %.3f\ntransit_p99_ms %.3f\n",
           percentile(transit_hist, transit_samples, 0.50),
           percentile(transit_hist, transit_samples, 0.99));
    return 0;
}
