/*
 * ceiling: the machine's ceiling for a ctime UDP server.
 *
 * One socket, one thread: recvmmsg up to 64 datagrams (blocking until at
 * least one), answer each with time.ctime()-style text (cached, rebuilt once
 * a second) using one sendmmsg. No logging, no policy: nothing a Python
 * server could do per datagram is cheaper than this.
 *
 * usage: ceiling PORT [HOST]   (HOST defaults to 127.0.0.1)
 * Build: cc -O2 -o ceiling ceiling.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BATCH 64

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s PORT [HOST]\n", argv[0]);
        return 2;
    }
    struct sockaddr_in addr;
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_port = htons((unsigned short)atoi(argv[1]));
    if (inet_pton(AF_INET, argc > 2 ? argv[2] : "127.0.0.1", &addr.sin_addr) != 1) {
        fprintf(stderr, "ceiling: bad host\n");
        return 2;
    }
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    if (fd < 0 || bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
        perror("ceiling: bind");
        return 1;
    }

    static char rx[BATCH][2048];
    struct sockaddr_in peers[BATCH];
    struct iovec rxiov[BATCH], txiov[BATCH];
    struct mmsghdr rxmsg[BATCH], txmsg[BATCH];
    char reply[64];
    size_t reply_len = 0;
    time_t cached = (time_t)-1;

    for (;;) {
        for (int i = 0; i < BATCH; i++) {
            rxiov[i].iov_base = rx[i];
            rxiov[i].iov_len = sizeof rx[i];
            memset(&rxmsg[i], 0, sizeof rxmsg[i]);
            rxmsg[i].msg_hdr.msg_iov = &rxiov[i];
            rxmsg[i].msg_hdr.msg_iovlen = 1;
            rxmsg[i].msg_hdr.msg_name = &peers[i];
            rxmsg[i].msg_hdr.msg_namelen = sizeof peers[i];
        }
        int n = recvmmsg(fd, rxmsg, BATCH, MSG_WAITFORONE, NULL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            perror("ceiling: recvmmsg");
            return 1;
        }
        time_t now = time(NULL);
        if (now != cached) {
            char buf[32];
            struct tm tm;
            localtime_r(&now, &tm);
            asctime_r(&tm, buf); /* "Wed Aug 15 20:35:08 2012\n", as ctime */
            reply_len = strcspn(buf, "\n");
            memcpy(reply, buf, reply_len);
            cached = now;
        }
        for (int i = 0; i < n; i++) {
            txiov[i].iov_base = reply;
            txiov[i].iov_len = reply_len;
            memset(&txmsg[i], 0, sizeof txmsg[i]);
            txmsg[i].msg_hdr.msg_iov = &txiov[i];
            txmsg[i].msg_hdr.msg_iovlen = 1;
            txmsg[i].msg_hdr.msg_name = &peers[i];
            txmsg[i].msg_hdr.msg_namelen = rxmsg[i].msg_hdr.msg_namelen;
        }
        int done = 0;
        while (done < n) {
            int r = sendmmsg(fd, txmsg + done, (unsigned)(n - done), 0);
            if (r <= 0) {
                if (r < 0 && errno == EINTR)
                    continue;
                break; /* drop the rest of this batch, as a full queue would */
            }
            done += r;
        }
    }
}
