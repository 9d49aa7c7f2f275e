/* The process tree the fuzz seed image is dumped from (fuzz/seed/make.sh):
 * small, but with something in every file of an image: a parent and a
 * child sharing copy-on-write pages, a pipe with buffered data, a unix
 * socketpair with queued data, a TCP listener on loopback, an eventfd, a
 * timerfd, a signalfd and an inotify watched by an epoll set, a deleted
 * file (saved file) and a SysV shm segment. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/inotify.h>
#include <sys/shm.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <unistd.h>

static char shared[3 * 4096];

int main(int argc, char **argv) {
    const char *ready = argc > 1 ? argv[1] : "/tmp/cowsnap-fuzz-seed.ready";
    memset(shared, 0x5a, sizeof shared);
    int p[2], sp[2];
    if (pipe(p) || write(p[1], "pipe data", 9) != 9) return 1;
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sp) || write(sp[0], "queued", 6) != 6) return 1;
    int l = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (bind(l, (struct sockaddr *)&a, sizeof a) || listen(l, 4)) return 1;
    int ev = eventfd(3, EFD_NONBLOCK);
    int tf = timerfd_create(CLOCK_MONOTONIC, 0);
    struct itimerspec its = {.it_value = {3600, 0}, .it_interval = {60, 0}};
    timerfd_settime(tf, 0, &its, NULL);
    sigset_t m;
    sigemptyset(&m);
    sigaddset(&m, SIGUSR2);
    sigprocmask(SIG_BLOCK, &m, NULL);
    int sf = signalfd(-1, &m, SFD_NONBLOCK);
    int in = inotify_init1(IN_NONBLOCK);
    inotify_add_watch(in, "/tmp", IN_CREATE | IN_DELETE);
    int ep = epoll_create1(0);
    int watched[] = {sp[1], ev, tf, l};
    for (unsigned i = 0; i < sizeof watched / sizeof *watched; i++) {
        struct epoll_event e = {.events = EPOLLIN, .data.u64 = i};
        epoll_ctl(ep, EPOLL_CTL_ADD, watched[i], &e);
    }
    char tmpl[] = "/tmp/cowsnap-fuzz-seed-XXXXXX";
    int del = mkstemp(tmpl);
    if (del < 0 || write(del, "deleted file contents\n", 22) != 22) return 1;
    unlink(tmpl);
    int shm = shmget(IPC_PRIVATE, 8192, IPC_CREAT | 0600);
    char *seg = shmat(shm, NULL, 0);
    if (seg == (void *)-1) return 1;
    memcpy(seg, "sysv", 4);
    if (fork() == 0) {
        shared[0] = 1; /* one page of three unshared */
        for (;;) pause();
    }
    FILE *f = fopen(ready, "w"); /* holds the shmid, for make.sh to remove */
    if (f) fprintf(f, "%d\n", shm), fclose(f);
    for (;;) pause();
}
