/*
 * The broker client's connections (conn.c): a pool of Unix socket connections per client,
 * each carrying one request at a time, its keys LOADed on it, fork safety and deadlines.
 * Internal to the client: client.c runs the operations on them.
 */
#ifndef TPMBROKER_CONN_H
#define TPMBROKER_CONN_H

#include <stdint.h>
#include <time.h>
#include <pthread.h>
#include <sys/types.h>

#include "client.h"

#define POOL_MAX 16
#define LOADED_MAX 16
#define AUTH_CACHE_MAX 128

/* A key this connection has LOADed, with the password it was loaded with. */
struct loaded_key {
    uint8_t key_id[WIRE_KEY_ID_SIZE];
    uint8_t auth[AUTH_CACHE_MAX];
    size_t authlen;
};

struct conn {
    int fd;               /* -1: not connected */
    int busy;             /* taken by a thread */
    uint32_t next_id;
    struct loaded_key loaded[LOADED_MAX];
    size_t nloaded;
    size_t next_slot;
    WIRE_WRITER *w;       /* request buffer */
    uint8_t *rbuf;        /* response buffer, WIRE_MAX_FRAME bytes */
};

/*
 * A thread waiting for a connection. A released connection is handed to the longest
 * waiter directly: a thread that releases and at once asks again must not overtake
 * threads already waiting (with 64 threads on 16 connections, some would starve).
 */
struct waiter {
    pthread_cond_t handed;
    struct conn *given;
    struct waiter *next;
};

struct tpmb_client {
    char *path;
    unsigned int timeout_ms;
    int reached; /* a broker answered HELLO once: when its socket is away, it is restarting */
    pthread_mutex_t lock;
    struct waiter *first, *last; /* FIFO of waiting threads */
    pid_t pid;
    struct conn conns[POOL_MAX];
    struct tpmb_client *next; /* all clients, for the fork handlers */
};

/*
 * A request a restarting broker could not serve goes out again after RETRY_FIRST_MS,
 * doubling to RETRY_MAX_MS; a broker's socket may be away RESTART_GRACE_MS (as the Python
 * client: tpmbroker/client.py).
 */
#define RETRY_FIRST_MS 10
#define RETRY_MAX_MS 250
#define RESTART_GRACE_MS 3000
#define MAX_LOST_CONNECTIONS 2

/* Sleeps `ms` milliseconds, but not past `deadline`; 0 if the deadline came first. */
int pause_until(unsigned int ms, int64_t deadline);

void set_err(CLIENT_ERR *err, int status, uint32_t tpm_rc, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static inline int64_t now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* What is left of the deadline, for a request's timeout field (at least 1 ms). */
static inline uint32_t remaining(int64_t deadline)
{
    int64_t left = deadline - now_ms();

    return left <= 0 ? 1 : (uint32_t)left;
}

static inline uint32_t next_id(struct conn *cn)
{
    if (++cn->next_id == 0)
        cn->next_id = 1; /* 0 is what the broker uses for unframeable input */
    return cn->next_id;
}

/* A connection of the pool for this thread alone, until conn_release; NULL: err says why. */
struct conn *conn_acquire(struct tpmb_client *c, int64_t deadline, CLIENT_ERR *err);
void conn_release(struct tpmb_client *c, struct conn *cn);
void conn_close(struct conn *cn);
/* Connects and says HELLO. */
int conn_open(struct tpmb_client *c, struct conn *cn, int64_t deadline, CLIENT_ERR *err);
/* 1 if an idle connection has something to read: it is not used again. */
int conn_unsolicited(struct conn *cn);
int conn_exchange(struct tpmb_client *c, struct conn *cn, size_t framelen, int64_t deadline,
                  WIRE_READER *body, CLIENT_ERR *err);
int malformed(struct tpmb_client *c, struct conn *cn, const char *what, CLIENT_ERR *err);
int response_ok(struct tpmb_client *c, struct conn *cn, WIRE_READER *body, const char *what,
                CLIENT_ERR *err);

/* The keys LOADed on a connection, with the password each was loaded with. */
int conn_key_ready(struct conn *cn, const CLIENT_KEY *key);
void conn_note_key(struct conn *cn, const CLIENT_KEY *key);
void conn_drop_key(struct conn *cn, const CLIENT_KEY *key);

#endif
