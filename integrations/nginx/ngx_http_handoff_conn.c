/*
 * Adopting a client socket that the agent passed in (handed in by a frontend, or returned by a
 * target) as an nginx HTTP connection: what ngx_event_accept does for an accepted socket, then
 * the listener's handler (ngx_http_init_connection), so the request runs through the normal
 * HTTP pipeline. Bytes the other side already read (the request) are served first by wrapping
 * c->recv, because nginx's own read path would drop a pre-filled buffer of an idle connection.
 */
#include "ngx_http_handoff.h"

#include <netinet/tcp.h>

#define XO_TCP_ULP              31   /* TCP_ULP, <linux/tcp.h> */
#define XO_TCP_ULP_NAME_MAX     16   /* TCP_ULP_NAME_MAX */
#define XO_PLAIN_LISTENERS      16   /* TLS listeners a worker can serve kTLS sockets on */
#define XO_SOL_TLS              282  /* SOL_TLS, <linux/socket.h> */
#define XO_TLS_GET_RECORD_TYPE  2    /* <linux/tls.h> */
#define XO_TLS_RECORD_ALERT     21   /* TLS ContentType alert */


/*
 * recv() on a kTLS socket served as plain HTTP: a record that is not application data (the
 * client's close_notify alert) fails recv() with EIO; read it to learn its type, and take an
 * alert as the end of the connection instead of an I/O error.
 */
static ssize_t
ngx_http_handoff_ktls_recv(ngx_connection_t *c, u_char *buf, size_t size)
{
    ssize_t          n;
    ngx_err_t        err;
    struct iovec     iov;
    struct msghdr    mh;
    struct cmsghdr  *cm;
    ngx_event_t     *rev = c->read;
    union {
        struct cmsghdr  align;
        char            buf[CMSG_SPACE(sizeof(u_char))];
    } cmsg;

    for ( ;; ) {
        n = recv(c->fd, buf, size, 0);
        if (n > 0) {
            return n;
        }
        if (n == 0) {
            rev->ready = 0;
            rev->eof = 1;
            return 0;
        }
        err = ngx_socket_errno;
        if (err == NGX_EINTR) {
            continue;
        }
        if (err == NGX_EAGAIN) {
            rev->ready = 0;
            return NGX_AGAIN;
        }
        if (err != EIO) {
            break;
        }

        ngx_memzero(&mh, sizeof(mh));
        iov.iov_base = buf;
        iov.iov_len = size;
        mh.msg_iov = &iov;
        mh.msg_iovlen = 1;
        mh.msg_control = cmsg.buf;
        mh.msg_controllen = sizeof(cmsg.buf);
        if (recvmsg(c->fd, &mh, 0) == -1) {
            err = ngx_socket_errno;
            break;
        }
        cm = CMSG_FIRSTHDR(&mh);
        if (cm && cm->cmsg_level == XO_SOL_TLS && cm->cmsg_type == XO_TLS_GET_RECORD_TYPE
            && *CMSG_DATA(cm) == XO_TLS_RECORD_ALERT)
        {
            ngx_log_error(NGX_LOG_INFO, c->log, 0, "handoff: client sent a TLS alert (kTLS)");
            rev->ready = 0;
            rev->eof = 1;
            return 0;
        }
        ngx_log_error(NGX_LOG_INFO, c->log, 0, "handoff: unexpected TLS record on kTLS socket");
        rev->ready = 0;
        rev->error = 1;
        return NGX_ERROR;
    }

    rev->ready = 0;
    rev->error = 1;
    ngx_connection_error(c, err, "recv() failed");
    return NGX_ERROR;
}


static ssize_t
ngx_http_handoff_recv(ngx_connection_t *c, u_char *buf, size_t size)
{
    size_t                        n;
    ngx_http_handoff_conn_ctx_t  *ctx;

    ctx = ngx_http_handoff_conn_ctx(c);
    if (ctx == NULL || ctx->preread_pos >= ctx->preread.len) {
        c->recv = ctx && ctx->ktls ? ngx_http_handoff_ktls_recv : ngx_recv;
        return c->recv(c, buf, size);
    }

    n = ngx_min(size, ctx->preread.len - ctx->preread_pos);
    ngx_memcpy(buf, ctx->preread.data + ctx->preread_pos, n);
    ctx->preread_pos += n;
    if (ctx->preread_pos == ctx->preread.len) {
        c->recv = ctx->ktls ? ngx_http_handoff_ktls_recv : ngx_recv;
    }
    return (ssize_t) n;
}


ngx_http_handoff_conn_ctx_t *
ngx_http_handoff_conn_ctx(ngx_connection_t *c)
{
    ngx_pool_cleanup_t  *cln;

    if (c->pool == NULL) {
        return NULL;
    }
    for (cln = c->pool->cleanup; cln; cln = cln->next) {
        if (cln->handler == ngx_http_handoff_conn_cleanup) {
            return cln->data;
        }
    }
    return NULL;
}


void
ngx_http_handoff_detach(ngx_connection_t *c)
{
    /* the socket lives on in the agent: closing our fd would not remove it from epoll */
    if (c->read->active || c->write->active) {
        if (ngx_del_conn) {
            (void) ngx_del_conn(c, 0);
        } else {
            if (c->read->active) {
                (void) ngx_del_event(c->read, NGX_READ_EVENT, 0);
            }
            if (c->write->active) {
                (void) ngx_del_event(c->write, NGX_WRITE_EVENT, 0);
            }
        }
    }
    if (c->read->timer_set) {
        ngx_del_timer(c->read);
    }
    if (c->write->timer_set) {
        ngx_del_timer(c->write);
    }
    if (c->read->posted) {
        ngx_delete_posted_event(c->read);
    }
    if (c->write->posted) {
        ngx_delete_posted_event(c->write);
    }
}


static ngx_int_t
ngx_http_handoff_same_port(struct sockaddr *a, struct sockaddr *b)
{
    return a->sa_family == b->sa_family && ngx_inet_get_port(a) == ngx_inet_get_port(b);
}


static ngx_int_t
ngx_http_handoff_is_wildcard(struct sockaddr *sa)
{
    switch (sa->sa_family) {
#if (NGX_HAVE_INET6)
    case AF_INET6:
        return IN6_IS_ADDR_UNSPECIFIED(&((struct sockaddr_in6 *) sa)->sin6_addr);
#endif
    case AF_INET:
        return ((struct sockaddr_in *) sa)->sin_addr.s_addr == INADDR_ANY;
    default:
        return 0;
    }
}


ngx_listening_t *
ngx_http_handoff_listener_for(ngx_socket_t fd)
{
    ngx_uint_t        i;
    ngx_listening_t  *ls, *wildcard;
    ngx_sockaddr_t    local;
    socklen_t         len;

    len = sizeof(local);
    if (getsockname(fd, &local.sockaddr, &len) == -1) {
        return NULL;
    }

    wildcard = NULL;
    ls = ngx_cycle->listening.elts;
    for (i = 0; i < ngx_cycle->listening.nelts; i++) {
        /* an exiting worker has closed its listening fds but still serves their servers */
        if (ls[i].handler != ngx_http_init_connection
            || !ngx_http_handoff_same_port(ls[i].sockaddr, &local.sockaddr))
        {
            continue;
        }
        if (ngx_cmp_sockaddr(ls[i].sockaddr, ls[i].socklen, &local.sockaddr, len, 1)
            == NGX_OK)
        {
            return &ls[i];
        }
        if (ngx_http_handoff_is_wildcard(ls[i].sockaddr)) {
            wildcard = &ls[i];
        }
    }
    return wildcard;
}


static ngx_int_t
ngx_http_handoff_set_addresses(ngx_connection_t *c)
{
    ngx_sockaddr_t  sa;
    socklen_t       len;

    len = sizeof(sa);
    if (getpeername(c->fd, &sa.sockaddr, &len) == -1) {
        ngx_log_error(NGX_LOG_ERR, c->log, ngx_socket_errno, "handoff: getpeername() failed");
        return NGX_ERROR;
    }
    c->sockaddr = ngx_palloc(c->pool, len);
    if (c->sockaddr == NULL) {
        return NGX_ERROR;
    }
    ngx_memcpy(c->sockaddr, &sa, len);
    c->socklen = len;

    len = sizeof(sa);
    if (getsockname(c->fd, &sa.sockaddr, &len) == -1) {
        ngx_log_error(NGX_LOG_ERR, c->log, ngx_socket_errno, "handoff: getsockname() failed");
        return NGX_ERROR;
    }
    c->local_sockaddr = ngx_palloc(c->pool, len);
    if (c->local_sockaddr == NULL) {
        return NGX_ERROR;
    }
    ngx_memcpy(c->local_sockaddr, &sa, len);
    c->local_socklen = len;

    if (c->listening->addr_ntop) {
        c->addr_text.data = ngx_pnalloc(c->pool, c->listening->addr_text_max_len);
        if (c->addr_text.data == NULL) {
            return NGX_ERROR;
        }
        c->addr_text.len = ngx_sock_ntop(c->sockaddr, c->socklen, c->addr_text.data,
                                         c->listening->addr_text_max_len, 0);
    }
    return NGX_OK;
}


static ngx_http_handoff_conn_ctx_t *
ngx_http_handoff_new_ctx(ngx_connection_t *c, xo_conn_kind_e kind, ngx_str_t *handoff_id,
    ngx_str_t *preread)
{
    ngx_pool_cleanup_t           *cln;
    ngx_http_handoff_conn_ctx_t  *ctx;

    cln = ngx_pool_cleanup_add(c->pool, sizeof(ngx_http_handoff_conn_ctx_t));
    if (cln == NULL) {
        return NULL;
    }
    ctx = cln->data;
    ngx_memzero(ctx, sizeof(*ctx));
    ctx->c = c;
    ctx->kind = kind;
    ctx->handoff_id.data = ngx_pstrdup(c->pool, handoff_id);
    ctx->handoff_id.len = handoff_id->len;
    if (preread->len) {
        ctx->preread.data = ngx_pnalloc(c->pool, preread->len);
        if (ctx->preread.data == NULL || ctx->handoff_id.data == NULL) {
            return NULL;
        }
        ngx_memcpy(ctx->preread.data, preread->data, preread->len);
        ctx->preread.len = preread->len;
    }
    cln->handler = ngx_http_handoff_conn_cleanup;
    return ctx;
}


/* Is the kernel doing TLS on this socket (kTLS: the "tls" upper layer protocol)? */
static ngx_uint_t
ngx_http_handoff_is_ktls(ngx_socket_t fd)
{
    char       ulp[XO_TCP_ULP_NAME_MAX];
    socklen_t  len = sizeof(ulp);

    ngx_memzero(ulp, sizeof(ulp));
    if (getsockopt(fd, IPPROTO_TCP, XO_TCP_ULP, ulp, &len) == -1) {
        return 0;
    }
    return ngx_strncmp(ulp, "tls", sizeof("tls")) == 0;
}


static ngx_uint_t
ngx_http_handoff_listener_ssl(ngx_listening_t *ls)
{
    ngx_http_port_t  *port = ls->servers;

#if (NGX_HAVE_INET6)
    if (ls->sockaddr->sa_family == AF_INET6) {
        return ((ngx_http_in6_addr_t *) port->addrs)[0].conf.ssl;
    }
#endif
    return ((ngx_http_in_addr_t *) port->addrs)[0].conf.ssl;
}


/*
 * A kTLS socket arriving on a TLS listener: the kernel already does the TLS, so nginx must serve
 * it as plain HTTP. nginx decides that by the listener's address configuration, so use a copy
 * of the listener whose addresses say "no ssl" (made once per listener and worker).
 */
static ngx_listening_t *
ngx_http_handoff_plain_listener(ngx_listening_t *ls)
{
    size_t                 size;
    ngx_uint_t             i;
    ngx_listening_t       *copy;
    ngx_http_port_t       *port, *nport;
    ngx_http_in_addr_t    *addr;
#if (NGX_HAVE_INET6)
    ngx_http_in6_addr_t   *addr6;
#endif
    static ngx_listening_t  *orig[XO_PLAIN_LISTENERS], *made[XO_PLAIN_LISTENERS];

    for (i = 0; i < XO_PLAIN_LISTENERS && orig[i]; i++) {
        if (orig[i] == ls) {
            return made[i];
        }
    }
    if (i == XO_PLAIN_LISTENERS) {
        return NULL;
    }

    port = ls->servers;
#if (NGX_HAVE_INET6)
    size = ls->sockaddr->sa_family == AF_INET6 ? sizeof(ngx_http_in6_addr_t)
                                                : sizeof(ngx_http_in_addr_t);
#else
    size = sizeof(ngx_http_in_addr_t);
#endif
    copy = ngx_palloc(ngx_cycle->pool, sizeof(ngx_listening_t));
    nport = ngx_palloc(ngx_cycle->pool, sizeof(ngx_http_port_t));
    if (copy == NULL || nport == NULL) {
        return NULL;
    }
    nport->naddrs = port->naddrs;
    nport->addrs = ngx_pnalloc(ngx_cycle->pool, size * port->naddrs);
    if (nport->addrs == NULL) {
        return NULL;
    }
    ngx_memcpy(nport->addrs, port->addrs, size * port->naddrs);
    for (i = 0; i < port->naddrs; i++) {
#if (NGX_HAVE_INET6)
        if (ls->sockaddr->sa_family == AF_INET6) {
            addr6 = nport->addrs;
            addr6[i].conf.ssl = 0;
            addr6[i].conf.http2 = 0;
            continue;
        }
#endif
        addr = nport->addrs;
        addr[i].conf.ssl = 0;
        addr[i].conf.http2 = 0;
    }
    *copy = *ls;
    copy->servers = nport;

    for (i = 0; orig[i]; i++) { /* void */ }
    orig[i] = ls;
    made[i] = copy;
    return copy;
}


ngx_connection_t *
ngx_http_handoff_adopt(ngx_socket_t fd, ngx_listening_t *ls, xo_conn_kind_e kind,
    ngx_str_t *handoff_id, ngx_str_t *preread, ngx_log_t *log)
{
    ngx_log_t                    *clog;
    ngx_connection_t             *c;
    ngx_uint_t                    ktls;
    ngx_listening_t              *plain;
    ngx_http_handoff_conn_ctx_t  *ctx;

    ktls = ngx_http_handoff_is_ktls(fd);
    if (ktls && ngx_http_handoff_listener_ssl(ls)) {
        plain = ngx_http_handoff_plain_listener(ls);
        if (plain == NULL) {
            ngx_log_error(NGX_LOG_ERR, log, 0, "handoff: no plain copy of the TLS listener");
            close(fd);
            return NULL;
        }
        ls = plain;
    }

#if (NGX_STAT_STUB)
    (void) ngx_atomic_fetch_add(ngx_stat_accepted, 1);
#endif

    c = ngx_get_connection(fd, log);
    if (c == NULL) {
        close(fd);
        return NULL;
    }
    c->type = SOCK_STREAM;

#if (NGX_STAT_STUB)
    (void) ngx_atomic_fetch_add(ngx_stat_active, 1);
#endif

    c->pool = ngx_create_pool(ls->pool_size, log);
    if (c->pool == NULL) {
        goto failed;
    }
    clog = ngx_palloc(c->pool, sizeof(ngx_log_t));
    if (clog == NULL) {
        goto failed;
    }
    *clog = ls->log;
    c->log = clog;
    c->pool->log = clog;
    c->read->log = clog;
    c->write->log = clog;
    c->listening = ls;

    if (ngx_nonblocking(fd) == -1 || ngx_http_handoff_set_addresses(c) != NGX_OK) {
        goto failed;
    }
    if (c->local_sockaddr->sa_family != ls->sockaddr->sa_family) {
        /* nginx reads the listener's addresses by the connection's family */
        ngx_log_error(NGX_LOG_ERR, log, 0, "handoff: no listener of the connection's family");
        goto failed;
    }

    ctx = ngx_http_handoff_new_ctx(c, kind, handoff_id, preread);
    if (ctx == NULL) {
        goto failed;
    }

    ctx->ktls = ktls;
    c->recv = ctx->preread.len ? ngx_http_handoff_recv
                               : ktls ? ngx_http_handoff_ktls_recv : ngx_recv;
    c->send = ngx_send;
    c->recv_chain = ngx_recv_chain;
    c->send_chain = ngx_send_chain;
    c->write->ready = 1;
    /* the restored socket may already hold the request: read before waiting for epoll */
    c->read->ready = 1;
    c->number = ngx_atomic_fetch_add(ngx_connection_counter, 1);
    c->start_time = ngx_current_msec;

#if (NGX_STAT_STUB)
    (void) ngx_atomic_fetch_add(ngx_stat_handled, 1);
#endif

    clog->data = NULL;
    clog->handler = NULL;
    ls->handler(c);
    return c;

failed:

    ngx_log_error(NGX_LOG_ERR, log, 0, "handoff: cannot adopt a connection from the agent");
#if (NGX_STAT_STUB)
    (void) ngx_atomic_fetch_add(ngx_stat_active, -1);
#endif
    if (c->pool) {
        ngx_destroy_pool(c->pool);
        c->pool = NULL;
    }
    ngx_close_connection(c);
    return NULL;
}
