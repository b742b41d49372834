/*
 * The worker's link to the local xo agent: one unix stream socket per worker, non-blocking and
 * driven by nginx events (a worker never blocks on the agent). Frames follow local.proto: a
 * 4-byte big-endian length, then a LocalMessage; a passed fd travels by SCM_RIGHTS with the
 * frame's first byte. Frames are read exactly (header, then body), so an fd can never be
 * mistaken for the next frame's. When the agent is absent or goes away the link retries on a
 * timer and the module serves requests locally meanwhile.
 */
#include "ngx_http_handoff.h"

#include <sys/un.h>

#define XO_LINK_MAX_FDS 4   /* more than one fd per frame is a protocol error */

typedef struct {
    ngx_queue_t               queue;
    ngx_socket_t              fd;
    size_t                    len;
    size_t                    sent;
    u_char                    data[1];
} xo_frame_t;

typedef struct {
    xo_link_state_e           state;
    ngx_connection_t         *c;
    ngx_http_handoff_main_conf_t *conf;
    ngx_log_t                *log;
    xo_link_message_pt        on_message;
    xo_link_down_pt           on_down;
    xo_link_busy_pt           busy;
    ngx_event_t               retry;
    ngx_queue_t               tx;
    u_char                    hdr[XO_FRAME_HEADER];
    size_t                    hdr_got;
    u_char                   *body;
    size_t                    body_len;
    size_t                    body_got;
    size_t                    body_cap;
    ngx_socket_t              rx_fd;
    ngx_uint_t                failures;
    unsigned                  exiting:1;
} xo_link_t;

static xo_link_t  xo_link;

static void xo_link_connect(ngx_event_t *ev);
static void xo_link_read_handler(ngx_event_t *rev);
static void xo_link_write_handler(ngx_event_t *wev);
static void xo_link_fail(const char *why, ngx_err_t err);
static ngx_int_t xo_link_dispatch(void);
static ngx_int_t xo_link_begin_body(void);
static ngx_int_t xo_link_flush(ngx_err_t *errp);


ngx_int_t
xo_link_start(ngx_cycle_t *cycle, ngx_http_handoff_main_conf_t *hmcf,
    xo_link_message_pt on_message, xo_link_down_pt on_down, xo_link_busy_pt busy)
{
    ngx_memzero(&xo_link, sizeof(xo_link));
    xo_link.conf = hmcf;
    xo_link.log = cycle->log;
    xo_link.on_message = on_message;
    xo_link.on_down = on_down;
    xo_link.busy = busy;
    xo_link.rx_fd = -1;
    ngx_queue_init(&xo_link.tx);

    xo_link.retry.handler = xo_link_connect;
    xo_link.retry.log = cycle->log;
    xo_link.retry.data = &xo_link;
    /* a worker that is shutting down must not wait for the reconnect timer */
    xo_link.retry.cancelable = 1;

    xo_link_connect(&xo_link.retry);
    return NGX_OK;
}


void
xo_link_stop(void)
{
    if (xo_link.retry.timer_set) {
        ngx_del_timer(&xo_link.retry);
    }
    if (xo_link.state != XO_LINK_DOWN) {
        xo_link.on_down = NULL;
        xo_link_fail("worker exits", 0);
    }
    if (xo_link.body) {
        ngx_free(xo_link.body);
        xo_link.body = NULL;
    }
}


xo_link_state_e
xo_link_state(void)
{
    return xo_link.state;
}


static void
xo_link_schedule_retry(void)
{
    if (!xo_link.retry.timer_set && !ngx_exiting && !ngx_terminate && !ngx_quit) {
        ngx_add_timer(&xo_link.retry, xo_link.conf->retry);
    }
}


static void
xo_link_connect(ngx_event_t *ev)
{
    ngx_socket_t         fd;
    ngx_connection_t    *c;
    struct sockaddr_un   sun;
    xo_local_msg_t       hello;
    ngx_err_t            err;
    ngx_uint_t           level;

    ngx_memzero(&sun, sizeof(sun));
    sun.sun_family = AF_UNIX;
    ngx_memcpy(sun.sun_path, xo_link.conf->agent_path.data, xo_link.conf->agent_path.len);

    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd == -1) {
        ngx_log_error(NGX_LOG_ALERT, xo_link.log, ngx_socket_errno, "handoff: socket() failed");
        xo_link_schedule_retry();
        return;
    }

    if (connect(fd, (struct sockaddr *) &sun, sizeof(sun)) == -1) {
        err = ngx_socket_errno;
        /* say it once, not every retry: requests are served locally meanwhile */
        level = xo_link.failures++ ? NGX_LOG_DEBUG : NGX_LOG_WARN;
        ngx_log_error(level, xo_link.log, err,
                      "handoff: cannot connect to agent \"%V\", serving locally",
                      &xo_link.conf->agent_path);
        close(fd);
        xo_link_schedule_retry();
        return;
    }

    c = ngx_get_connection(fd, xo_link.log);
    if (c == NULL) {
        close(fd);
        xo_link_schedule_retry();
        return;
    }

    c->data = &xo_link;
    c->read->handler = xo_link_read_handler;
    c->write->handler = xo_link_write_handler;
    c->read->log = xo_link.log;
    c->write->log = xo_link.log;
    c->write->ready = 1;
    /* "idle": a worker that starts a graceful exit calls our read handler with c->close */
    c->idle = 1;
    xo_link.c = c;
    xo_link.state = XO_LINK_HELLO;
    xo_link.hdr_got = 0;
    xo_link.body_got = 0;

    if (ngx_handle_read_event(c->read, 0) != NGX_OK) {
        xo_link_fail("cannot watch the agent socket", 0);
        return;
    }

    ngx_memzero(&hello, sizeof(hello));
    hello.type = XO_MSG_HELLO;
    hello.app.data = xo_link.conf->app.data;
    hello.app.len = xo_link.conf->app.len;
    hello.flag = 1;   /* accept_connections: handed-in and returned sockets come here */
    (void) xo_link_send(&hello, -1);
}


ngx_int_t
xo_link_send(xo_local_msg_t *msg, ngx_socket_t fd)
{
    size_t       size;
    long         n;
    xo_frame_t  *f;
    ngx_err_t    err = 0;

    if (xo_link.state == XO_LINK_DOWN) {
        return NGX_ERROR;
    }

    size = xo_local_encoded_size(msg);
    if (size == 0 || size > XO_FRAME_MAX) {
        ngx_log_error(NGX_LOG_ALERT, xo_link.log, 0, "handoff: message too large: %uz", size);
        return NGX_ERROR;
    }

    f = ngx_alloc(sizeof(xo_frame_t) + XO_FRAME_HEADER + size, xo_link.log);
    if (f == NULL) {
        return NGX_ERROR;
    }

    n = xo_local_encode(msg, f->data + XO_FRAME_HEADER, size);
    if (n < 0) {
        ngx_log_error(NGX_LOG_ALERT, xo_link.log, 0, "handoff: encode: %s",
                      xo_local_strerror((int) n));
        ngx_free(f);
        return NGX_ERROR;
    }
    f->data[0] = (u_char) (n >> 24);
    f->data[1] = (u_char) (n >> 16);
    f->data[2] = (u_char) (n >> 8);
    f->data[3] = (u_char) n;
    f->len = XO_FRAME_HEADER + (size_t) n;
    f->sent = 0;
    f->fd = fd;
    ngx_queue_insert_tail(&xo_link.tx, &f->queue);

    /* write now; a failure is reported from the event loop, so it reaches every waiter the
     * same way and never re-enters the caller */
    if (xo_link.c->write->ready && xo_link_flush(&err) == NGX_ERROR
        && !xo_link.c->write->posted)
    {
        ngx_post_event(xo_link.c->write, &ngx_posted_events);
    }
    return NGX_OK;
}


/* Writes queued frames until done or EAGAIN; NGX_ERROR leaves the failing to the caller. */
static ngx_int_t
xo_link_flush(ngx_err_t *errp)
{
    ssize_t          n;
    xo_frame_t      *f;
    struct iovec     iov;
    struct msghdr    mh;
    struct cmsghdr  *cm;
    ngx_err_t        err;
    ngx_event_t     *wev = xo_link.c->write;
    union {
        struct cmsghdr  align;
        char            buf[CMSG_SPACE(sizeof(int))];
    } cmsg;

    while (!ngx_queue_empty(&xo_link.tx)) {
        f = ngx_queue_data(ngx_queue_head(&xo_link.tx), xo_frame_t, queue);

        ngx_memzero(&mh, sizeof(mh));
        iov.iov_base = f->data + f->sent;
        iov.iov_len = f->len - f->sent;
        mh.msg_iov = &iov;
        mh.msg_iovlen = 1;

        if (f->sent == 0 && f->fd != -1) {
            ngx_memzero(&cmsg, sizeof(cmsg));
            mh.msg_control = cmsg.buf;
            mh.msg_controllen = sizeof(cmsg.buf);
            cm = CMSG_FIRSTHDR(&mh);
            cm->cmsg_level = SOL_SOCKET;
            cm->cmsg_type = SCM_RIGHTS;
            cm->cmsg_len = CMSG_LEN(sizeof(int));
            ngx_memcpy(CMSG_DATA(cm), &f->fd, sizeof(int));
        }

        n = sendmsg(xo_link.c->fd, &mh, MSG_NOSIGNAL);
        if (n == -1) {
            err = ngx_socket_errno;
            if (err == NGX_EINTR) {
                continue;
            }
            if (err == NGX_EAGAIN) {
                wev->ready = 0;
                return ngx_handle_write_event(wev, 0) == NGX_OK ? NGX_AGAIN : NGX_ERROR;
            }
            *errp = err;
            return NGX_ERROR;
        }

        f->sent += (size_t) n;
        if (f->sent == f->len) {
            ngx_queue_remove(&f->queue);
            ngx_free(f);
        }
    }
    return NGX_OK;
}


static void
xo_link_write_handler(ngx_event_t *wev)
{
    ngx_err_t  err = 0;

    if (xo_link.state != XO_LINK_DOWN && xo_link_flush(&err) == NGX_ERROR) {
        xo_link_fail("sendmsg() to agent failed", err);
    }
}


static void
xo_link_take_fds(struct msghdr *mh)
{
    struct cmsghdr  *cm;
    int             *fds;
    size_t           i, n;

    for (cm = CMSG_FIRSTHDR(mh); cm; cm = CMSG_NXTHDR(mh, cm)) {
        if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS) {
            continue;
        }
        fds = (int *) CMSG_DATA(cm);
        n = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (i = 0; i < n; i++) {
            if (xo_link.rx_fd == -1) {
                xo_link.rx_fd = fds[i];
            } else {
                ngx_log_error(NGX_LOG_ERR, xo_link.log, 0,
                              "handoff: agent passed more than one fd in a frame");
                close(fds[i]);
            }
        }
    }
}


static void
xo_link_read_handler(ngx_event_t *rev)
{
    ssize_t        n;
    u_char        *buf;
    size_t         want;
    struct iovec   iov;
    struct msghdr  mh;
    ngx_err_t      err;
    union {
        struct cmsghdr  align;
        char            buf[CMSG_SPACE(XO_LINK_MAX_FDS * sizeof(int))];
    } cmsg;

    if (xo_link.c->close) {
        xo_link.c->close = 0;
        xo_link.exiting = 1;
    }

    while (xo_link.state != XO_LINK_DOWN) {
        if (xo_link.hdr_got == XO_FRAME_HEADER && xo_link.body_got == xo_link.body_len) {
            if (xo_link_dispatch() != NGX_OK) {
                return;
            }
            continue;
        }

        if (xo_link.hdr_got < XO_FRAME_HEADER) {
            buf = xo_link.hdr + xo_link.hdr_got;
            want = XO_FRAME_HEADER - xo_link.hdr_got;
        } else {
            buf = xo_link.body + xo_link.body_got;
            want = xo_link.body_len - xo_link.body_got;
        }

        ngx_memzero(&mh, sizeof(mh));
        iov.iov_base = buf;
        iov.iov_len = want;
        mh.msg_iov = &iov;
        mh.msg_iovlen = 1;
        mh.msg_control = cmsg.buf;
        mh.msg_controllen = sizeof(cmsg.buf);

        n = recvmsg(xo_link.c->fd, &mh, MSG_CMSG_CLOEXEC);
        if (n == -1) {
            err = ngx_socket_errno;
            if (err == NGX_EINTR) {
                continue;
            }
            if (err == NGX_EAGAIN) {
                rev->ready = 0;
                if (xo_link.exiting && xo_link.hdr_got == 0 && !xo_link.busy()) {
                    /* let the agent send connections to the new workers only */
                    xo_link_stop();
                    return;
                }
                if (ngx_handle_read_event(rev, 0) != NGX_OK) {
                    xo_link_fail("cannot watch the agent socket", 0);
                }
                return;
            }
            xo_link_fail("recvmsg() from agent failed", err);
            return;
        }
        if (n == 0) {
            xo_link_fail("agent closed the connection", 0);
            return;
        }

        xo_link_take_fds(&mh);
        if (mh.msg_flags & MSG_CTRUNC) {
            xo_link_fail("agent passed too many fds", 0);
            return;
        }

        if (xo_link.hdr_got < XO_FRAME_HEADER) {
            xo_link.hdr_got += (size_t) n;
            if (xo_link.hdr_got == XO_FRAME_HEADER && xo_link_begin_body() != NGX_OK) {
                return;
            }
        } else {
            xo_link.body_got += (size_t) n;
        }
    }
}


/* The frame header is complete: size the body buffer. */
static ngx_int_t
xo_link_begin_body(void)
{
    xo_link.body_len = (size_t) xo_link.hdr[0] << 24 | (size_t) xo_link.hdr[1] << 16
                       | (size_t) xo_link.hdr[2] << 8 | xo_link.hdr[3];
    xo_link.body_got = 0;
    if (xo_link.body_len > XO_FRAME_MAX) {
        xo_link_fail("agent frame too large", 0);
        return NGX_ERROR;
    }
    if (xo_link.body_len > xo_link.body_cap) {
        if (xo_link.body) {
            ngx_free(xo_link.body);
        }
        xo_link.body = ngx_alloc(xo_link.body_len, xo_link.log);
        xo_link.body_cap = xo_link.body ? xo_link.body_len : 0;
        if (xo_link.body == NULL) {
            xo_link_fail("out of memory", 0);
            return NGX_ERROR;
        }
    }
    return NGX_OK;
}


/* A whole frame is in: decode it and hand it on. NGX_ERROR: the link went down. */
static ngx_int_t
xo_link_dispatch(void)
{
    xo_local_msg_t  msg;
    ngx_socket_t    fd;
    int             rc;

    fd = xo_link.rx_fd;
    xo_link.rx_fd = -1;
    xo_link.hdr_got = 0;
    xo_link.body_got = 0;

    rc = xo_local_decode(xo_link.body, xo_link.body_len, &msg);
    if (rc != 0) {
        ngx_log_error(NGX_LOG_ERR, xo_link.log, 0, "handoff: bad frame from agent: %s",
                      xo_local_strerror(rc));
        if (fd != -1) {
            close(fd);
        }
        xo_link_fail("protocol error", 0);
        return NGX_ERROR;
    }

    if (xo_link.state == XO_LINK_HELLO) {
        if (msg.type != XO_MSG_HELLO_REPLY || !msg.flag) {
            ngx_log_error(NGX_LOG_ERR, xo_link.log, 0, "handoff: agent refused hello: %*s",
                          msg.detail.len, msg.detail.data);
            if (fd != -1) {
                close(fd);
            }
            xo_link_fail("hello refused", 0);
            return NGX_ERROR;
        }
        xo_link.state = XO_LINK_READY;
        xo_link.failures = 0;
        ngx_log_error(NGX_LOG_NOTICE, xo_link.log, 0, "handoff: connected to agent \"%*s\"%s",
                      msg.agent.len, msg.agent.data, msg.ktls ? " (kTLS)" : "");
        return NGX_OK;
    }

    xo_link.on_message(&msg, fd);
    return xo_link.state == XO_LINK_DOWN ? NGX_ERROR : NGX_OK;
}


static void
xo_link_fail(const char *why, ngx_err_t err)
{
    xo_frame_t        *f;
    ngx_queue_t       *q;
    xo_link_down_pt    on_down;
    ngx_uint_t         level;

    if (xo_link.state == XO_LINK_DOWN) {
        return;
    }
    level = xo_link.on_down ? NGX_LOG_WARN : NGX_LOG_INFO;
    ngx_log_error(level, xo_link.log, err,
                  "handoff: agent link down: %s", why);

    /* fds in unsent frames belong to their callers, who learn about it from on_down */
    while (!ngx_queue_empty(&xo_link.tx)) {
        q = ngx_queue_head(&xo_link.tx);
        ngx_queue_remove(q);
        f = ngx_queue_data(q, xo_frame_t, queue);
        ngx_free(f);
    }
    if (xo_link.rx_fd != -1) {
        close(xo_link.rx_fd);
        xo_link.rx_fd = -1;
    }
    ngx_close_connection(xo_link.c);
    xo_link.c = NULL;
    xo_link.state = XO_LINK_DOWN;
    xo_link.hdr_got = 0;
    xo_link.body_got = 0;

    on_down = xo_link.on_down;
    if (on_down) {
        on_down();
        xo_link_schedule_retry();
    }
}
