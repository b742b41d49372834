/*
 * XO handoff module: moves a live client connection, with the request nginx already parsed,
 * from this (frontend) nginx to a backend through the local xo agent, and serves connections
 * the agent hands in (backend) or returns (frontend) with nginx's normal HTTP code path.
 *
 *   handoff_agent unix:PATH;        http   the local agent's socket (workers connect to it)
 *   handoff_app NAME;               http   app name at the agent (default "nginx")
 *   handoff_agent_retry TIME;       http   reconnect delay when the agent is away (1s)
 *   handoff_giveback_timeout TIME;  http   how long a give-back waits for its answer (5s)
 *   handoff_in on|off;              server serve connections handed in, then give them back
 *   handoff_out;                    location  hand requests here off to a target
 *   handoff_target PEER|ADDR:PORT;  http/server/location, repeatable: targets, round robin
 *   handoff_freq N;                 offload every Nth request (0 or 1: every request)
 *   handoff_timeout TIME;           wait for the agent's answer, then serve locally (5s)
 *   variables: $handoff_status (local|out|fallback|in), $handoff_target, $handoff_id
 */
#include "ngx_http_handoff.h"

#include <sys/un.h>

#define XO_DEFAULT_APP          "nginx"
#define XO_DEFAULT_RETRY        1000
#define XO_DEFAULT_TIMEOUT      5000
#define XO_CRLF_LEN             2
#define XO_HEADER_SEP_LEN       2      /* ": " */

typedef struct {
    ngx_flag_t                in;
} ngx_http_handoff_srv_conf_t;

typedef struct {
    ngx_flag_t                out;
    ngx_array_t              *targets;     /* of ngx_str_t "ADDR:PORT" */
    ngx_uint_t                freq;
    ngx_msec_t                timeout;
    ngx_uint_t                count;       /* requests seen by this worker (handoff_freq) */
    ngx_uint_t                next;        /* round robin position */
} ngx_http_handoff_loc_conf_t;

/* Per request: what happened (for the variables) and the wait for OffloadResult. */
typedef struct {
    ngx_http_request_t       *r;
    ngx_str_t                 status;
    ngx_str_t                 target;
    ngx_str_t                 handoff_id;
    uint64_t                  request_id;
    ngx_queue_t               queue;
    ngx_event_t               timer;
    unsigned                  waiting:1;
} ngx_http_handoff_req_ctx_t;

/* A connection given back to the agent, kept (dup'ed fd) until GiveBackResult. */
typedef struct {
    ngx_queue_t               queue;
    ngx_socket_t              fd;
    ngx_listening_t          *ls;
    ngx_str_t                 handoff_id;
    ngx_event_t               timer;
    u_char                    id[1];
} ngx_http_handoff_giveback_t;

static ngx_int_t ngx_http_handoff_add_variables(ngx_conf_t *cf);
static ngx_int_t ngx_http_handoff_init(ngx_conf_t *cf);
static void *ngx_http_handoff_create_main_conf(ngx_conf_t *cf);
static char *ngx_http_handoff_init_main_conf(ngx_conf_t *cf, void *conf);
static void *ngx_http_handoff_create_srv_conf(ngx_conf_t *cf);
static char *ngx_http_handoff_merge_srv_conf(ngx_conf_t *cf, void *parent, void *child);
static void *ngx_http_handoff_create_loc_conf(ngx_conf_t *cf);
static char *ngx_http_handoff_merge_loc_conf(ngx_conf_t *cf, void *parent, void *child);
static char *ngx_http_handoff_agent(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);
static char *ngx_http_handoff_target(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);
static char *ngx_http_handoff_out(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);
static ngx_int_t ngx_http_handoff_init_process(ngx_cycle_t *cycle);
static void ngx_http_handoff_exit_process(ngx_cycle_t *cycle);
static void ngx_http_handoff_giveback_send(ngx_http_handoff_giveback_t *gb, ngx_log_t *log);

static ngx_queue_t       ngx_http_handoff_waiting;    /* requests awaiting OffloadResult */
static ngx_queue_t       ngx_http_handoff_givebacks;  /* give-backs awaiting their result */
static uint64_t          ngx_http_handoff_last_id;
/* The handoff_in listener per address family (nginx reads a listener's addresses by the
 * connection's family, so a handed-in socket needs a listener of its own family). */
static ngx_listening_t  *ngx_http_handoff_in_listener4;
static ngx_listening_t  *ngx_http_handoff_in_listener6;

static ngx_str_t  ngx_http_handoff_st_local = ngx_string("local");
static ngx_str_t  ngx_http_handoff_st_out = ngx_string("out");
static ngx_str_t  ngx_http_handoff_st_fallback = ngx_string("fallback");
static ngx_str_t  ngx_http_handoff_st_in = ngx_string("in");
static ngx_str_t  ngx_http_handoff_none = ngx_string("(none)");


static ngx_command_t  ngx_http_handoff_commands[] = {

    { ngx_string("handoff_agent"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_http_handoff_agent,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("handoff_app"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_str_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_handoff_main_conf_t, app),
      NULL },

    { ngx_string("handoff_agent_retry"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_handoff_main_conf_t, retry),
      NULL },

    { ngx_string("handoff_giveback_timeout"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_handoff_main_conf_t, giveback_timeout),
      NULL },

    { ngx_string("handoff_in"),
      NGX_HTTP_SRV_CONF|NGX_CONF_FLAG,
      ngx_conf_set_flag_slot,
      NGX_HTTP_SRV_CONF_OFFSET,
      offsetof(ngx_http_handoff_srv_conf_t, in),
      NULL },

    { ngx_string("handoff_out"),
      NGX_HTTP_LOC_CONF|NGX_CONF_NOARGS,
      ngx_http_handoff_out,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("handoff_target"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_handoff_target,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("handoff_freq"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_handoff_loc_conf_t, freq),
      NULL },

    { ngx_string("handoff_timeout"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_handoff_loc_conf_t, timeout),
      NULL },

      ngx_null_command
};


static ngx_http_module_t  ngx_http_handoff_module_ctx = {
    ngx_http_handoff_add_variables,        /* preconfiguration */
    ngx_http_handoff_init,                 /* postconfiguration */
    ngx_http_handoff_create_main_conf,     /* create main configuration */
    ngx_http_handoff_init_main_conf,       /* init main configuration */
    ngx_http_handoff_create_srv_conf,      /* create server configuration */
    ngx_http_handoff_merge_srv_conf,       /* merge server configuration */
    ngx_http_handoff_create_loc_conf,      /* create location configuration */
    ngx_http_handoff_merge_loc_conf        /* merge location configuration */
};


ngx_module_t  ngx_http_handoff_module = {
    NGX_MODULE_V1,
    &ngx_http_handoff_module_ctx,          /* module context */
    ngx_http_handoff_commands,             /* module directives */
    NGX_HTTP_MODULE,                       /* module type */
    NULL,                                  /* init master */
    NULL,                                  /* init module */
    ngx_http_handoff_init_process,         /* init process */
    NULL,                                  /* init thread */
    NULL,                                  /* exit thread */
    ngx_http_handoff_exit_process,         /* exit process */
    NULL,                                  /* exit master */
    NGX_MODULE_V1_PADDING
};


/* ---- configuration ------------------------------------------------------------------- */

static void *
ngx_http_handoff_create_main_conf(ngx_conf_t *cf)
{
    ngx_http_handoff_main_conf_t  *hmcf;

    hmcf = ngx_pcalloc(cf->pool, sizeof(ngx_http_handoff_main_conf_t));
    if (hmcf == NULL) {
        return NULL;
    }
    hmcf->retry = NGX_CONF_UNSET_MSEC;
    hmcf->giveback_timeout = NGX_CONF_UNSET_MSEC;
    return hmcf;
}


static char *
ngx_http_handoff_init_main_conf(ngx_conf_t *cf, void *conf)
{
    ngx_http_handoff_main_conf_t  *hmcf = conf;

    if (hmcf->app.len == 0) {
        ngx_str_set(&hmcf->app, XO_DEFAULT_APP);
    }
    ngx_conf_init_msec_value(hmcf->retry, XO_DEFAULT_RETRY);
    ngx_conf_init_msec_value(hmcf->giveback_timeout, XO_DEFAULT_TIMEOUT);
    return NGX_CONF_OK;
}


static void *
ngx_http_handoff_create_srv_conf(ngx_conf_t *cf)
{
    ngx_http_handoff_srv_conf_t  *hscf;

    hscf = ngx_pcalloc(cf->pool, sizeof(ngx_http_handoff_srv_conf_t));
    if (hscf == NULL) {
        return NULL;
    }
    hscf->in = NGX_CONF_UNSET;
    return hscf;
}


static char *
ngx_http_handoff_merge_srv_conf(ngx_conf_t *cf, void *parent, void *child)
{
    ngx_http_handoff_srv_conf_t  *prev = parent;
    ngx_http_handoff_srv_conf_t  *conf = child;

    ngx_conf_merge_value(conf->in, prev->in, 0);
    return NGX_CONF_OK;
}


static void *
ngx_http_handoff_create_loc_conf(ngx_conf_t *cf)
{
    ngx_http_handoff_loc_conf_t  *hlcf;

    hlcf = ngx_pcalloc(cf->pool, sizeof(ngx_http_handoff_loc_conf_t));
    if (hlcf == NULL) {
        return NULL;
    }
    hlcf->targets = NGX_CONF_UNSET_PTR;
    hlcf->freq = NGX_CONF_UNSET_UINT;
    hlcf->timeout = NGX_CONF_UNSET_MSEC;
    return hlcf;
}


static char *
ngx_http_handoff_merge_loc_conf(ngx_conf_t *cf, void *parent, void *child)
{
    ngx_http_handoff_loc_conf_t  *prev = parent;
    ngx_http_handoff_loc_conf_t  *conf = child;

    ngx_conf_merge_ptr_value(conf->targets, prev->targets, NULL);
    ngx_conf_merge_uint_value(conf->freq, prev->freq, 0);
    ngx_conf_merge_msec_value(conf->timeout, prev->timeout, XO_DEFAULT_TIMEOUT);

    if (conf->out && conf->targets == NULL) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "\"handoff_out\" needs a \"handoff_target\"");
        return NGX_CONF_ERROR;
    }
    return NGX_CONF_OK;
}


static char *
ngx_http_handoff_agent(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_handoff_main_conf_t  *hmcf = conf;
    ngx_str_t                     *value = cf->args->elts;
    struct sockaddr_un             sun;

    if (hmcf->agent_path.data) {
        return "is duplicate";
    }
    if (value[1].len <= sizeof("unix:") - 1
        || ngx_strncmp(value[1].data, "unix:", sizeof("unix:") - 1) != 0)
    {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"handoff_agent\" wants \"unix:PATH\", got \"%V\"", &value[1]);
        return NGX_CONF_ERROR;
    }
    hmcf->agent_path.data = value[1].data + sizeof("unix:") - 1;
    hmcf->agent_path.len = value[1].len - (sizeof("unix:") - 1);
    if (hmcf->agent_path.len >= sizeof(sun.sun_path)) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "\"handoff_agent\" path too long: \"%V\"",
                           &hmcf->agent_path);
        return NGX_CONF_ERROR;
    }
    return NGX_CONF_OK;
}


/* A peer name of the agent's config ("b0"), or ADDR:PORT; the agent resolves it. */
static ngx_int_t
ngx_http_handoff_valid_target(ngx_conf_t *cf, ngx_str_t *t)
{
    size_t     i;
    ngx_url_t  u;

    if (ngx_strlchr(t->data, t->data + t->len, ':') == NULL) {
        for (i = 0; i < t->len; i++) {
            if (!isalnum(t->data[i]) && t->data[i] != '-' && t->data[i] != '_'
                && t->data[i] != '.')
            {
                return NGX_ERROR;
            }
        }
        return t->len ? NGX_OK : NGX_ERROR;
    }
    ngx_memzero(&u, sizeof(ngx_url_t));
    u.url = *t;
    u.no_resolve = 1;
    if (ngx_parse_url(cf->pool, &u) != NGX_OK || u.no_port || u.family == AF_UNIX) {
        return NGX_ERROR;
    }
    return NGX_OK;
}


static char *
ngx_http_handoff_target(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_handoff_loc_conf_t  *hlcf = conf;
    ngx_str_t                    *value = cf->args->elts, *t;

    if (ngx_http_handoff_valid_target(cf, &value[1]) != NGX_OK) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"handoff_target\" wants a peer name or ADDR:PORT, got \"%V\"",
                           &value[1]);
        return NGX_CONF_ERROR;
    }

    if (hlcf->targets == NGX_CONF_UNSET_PTR) {
        hlcf->targets = ngx_array_create(cf->pool, 2, sizeof(ngx_str_t));
        if (hlcf->targets == NULL) {
            return NGX_CONF_ERROR;
        }
    }
    t = ngx_array_push(hlcf->targets);
    if (t == NULL) {
        return NGX_CONF_ERROR;
    }
    *t = value[1];
    return NGX_CONF_OK;
}


static ngx_int_t ngx_http_handoff_out_handler(ngx_http_request_t *r);

static char *
ngx_http_handoff_out(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_handoff_loc_conf_t  *hlcf = conf;
    ngx_http_core_loc_conf_t     *clcf;

    if (hlcf->out) {
        return "is duplicate";
    }
    hlcf->out = 1;
    clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);
    clcf->handler = ngx_http_handoff_out_handler;
    return NGX_CONF_OK;
}


/* ---- variables ----------------------------------------------------------------------- */

enum { XO_VAR_STATUS, XO_VAR_TARGET, XO_VAR_ID };

static ngx_int_t
ngx_http_handoff_variable(ngx_http_request_t *r, ngx_http_variable_value_t *v, uintptr_t data)
{
    ngx_str_t                     s;
    ngx_http_handoff_req_ctx_t   *ctx;
    ngx_http_handoff_conn_ctx_t  *cctx;

    ngx_str_null(&s);
    ctx = ngx_http_get_module_ctx(r->main, ngx_http_handoff_module);
    cctx = ngx_http_handoff_conn_ctx(r->connection);

    switch (data) {
    case XO_VAR_STATUS:
        if (ctx && ctx->status.len) {
            s = ctx->status;
        } else if (cctx && cctx->kind == XO_CONN_IN) {
            s = ngx_http_handoff_st_in;
        }
        break;
    case XO_VAR_TARGET:
        if (ctx) {
            s = ctx->target;
        }
        break;
    default:
        if (ctx && ctx->handoff_id.len) {
            s = ctx->handoff_id;
        } else if (cctx && cctx->kind == XO_CONN_IN) {
            s = cctx->handoff_id;
        }
        break;
    }

    if (s.len == 0) {
        v->not_found = 1;
        return NGX_OK;
    }
    v->data = s.data;
    v->len = s.len;
    v->valid = 1;
    v->no_cacheable = 1;
    v->not_found = 0;
    return NGX_OK;
}


static ngx_http_variable_t  ngx_http_handoff_vars[] = {
    { ngx_string("handoff_status"), NULL, ngx_http_handoff_variable, XO_VAR_STATUS,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },
    { ngx_string("handoff_target"), NULL, ngx_http_handoff_variable, XO_VAR_TARGET,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },
    { ngx_string("handoff_id"), NULL, ngx_http_handoff_variable, XO_VAR_ID,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },
      ngx_http_null_variable
};


static ngx_int_t
ngx_http_handoff_add_variables(ngx_conf_t *cf)
{
    ngx_http_variable_t  *var, *v;

    for (v = ngx_http_handoff_vars; v->name.len; v++) {
        var = ngx_http_add_variable(cf, &v->name, v->flags);
        if (var == NULL) {
            return NGX_ERROR;
        }
        var->get_handler = v->get_handler;
        var->data = v->data;
    }
    return NGX_OK;
}


/* ---- handoff_out: frontend ----------------------------------------------------------- */

static ngx_http_handoff_req_ctx_t *
ngx_http_handoff_req_ctx(ngx_http_request_t *r)
{
    ngx_http_handoff_req_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_http_handoff_module);
    if (ctx == NULL) {
        ctx = ngx_pcalloc(r->pool, sizeof(ngx_http_handoff_req_ctx_t));
        if (ctx == NULL) {
            return NULL;
        }
        ctx->r = r;
        ngx_http_set_ctx(r, ctx, ngx_http_handoff_module);
    }
    return ctx;
}


/*
 * The request as the client sent it, rebuilt from the parsed request line and headers (nginx
 * NUL-patches its header buffer while parsing), plus any bytes read past the headers.
 */
static ngx_int_t
ngx_http_handoff_rebuild(ngx_http_request_t *r, ngx_str_t *out)
{
    size_t            len;
    u_char           *p;
    ngx_uint_t        i;
    ngx_list_part_t  *part;
    ngx_table_elt_t  *h;

    len = r->request_line.len + XO_CRLF_LEN + XO_CRLF_LEN
          + (size_t) (r->header_in->last - r->header_in->pos);
    for (part = &r->headers_in.headers.part; part; part = part->next) {
        h = part->elts;
        for (i = 0; i < part->nelts; i++) {
            len += h[i].key.len + XO_HEADER_SEP_LEN + h[i].value.len + XO_CRLF_LEN;
        }
    }

    p = ngx_pnalloc(r->pool, len);
    if (p == NULL) {
        return NGX_ERROR;
    }
    out->data = p;
    p = ngx_cpymem(p, r->request_line.data, r->request_line.len);
    *p++ = CR; *p++ = LF;
    for (part = &r->headers_in.headers.part; part; part = part->next) {
        h = part->elts;
        for (i = 0; i < part->nelts; i++) {
            p = ngx_cpymem(p, h[i].key.data, h[i].key.len);
            *p++ = ':'; *p++ = ' ';
            p = ngx_cpymem(p, h[i].value.data, h[i].value.len);
            *p++ = CR; *p++ = LF;
        }
    }
    *p++ = CR; *p++ = LF;
    p = ngx_cpymem(p, r->header_in->pos, r->header_in->last - r->header_in->pos);
    out->len = p - out->data;
    return NGX_OK;
}


/* Serve the request here after all: continue with the location's other content handlers. */
static void
ngx_http_handoff_serve_locally(ngx_http_request_t *r)
{
    ngx_connection_t  *c = r->connection;

    r->read_event_handler = ngx_http_block_reading;
    ngx_http_finalize_request(r, NGX_DECLINED);
    ngx_http_run_posted_requests(c);
}


static void
ngx_http_handoff_stop_waiting(ngx_http_handoff_req_ctx_t *ctx)
{
    if (ctx->waiting) {
        ctx->waiting = 0;
        ngx_queue_remove(&ctx->queue);
    }
    if (ctx->timer.timer_set) {
        ngx_del_timer(&ctx->timer);
    }
}


static void
ngx_http_handoff_request_cleanup(void *data)
{
    ngx_http_handoff_stop_waiting(data);
}


static void
ngx_http_handoff_offload_timeout(ngx_event_t *ev)
{
    ngx_http_handoff_req_ctx_t  *ctx = ev->data;

    ngx_log_error(NGX_LOG_WARN, ev->log, 0,
                  "handoff: no answer from agent for request %uL, serving locally",
                  ctx->request_id);
    ngx_http_handoff_stop_waiting(ctx);
    ctx->status = ngx_http_handoff_st_fallback;
    ngx_http_handoff_serve_locally(ctx->r);
}


#if (NGX_HTTP_SSL)

/*
 * A TLS connection can move only when OpenSSL handed both directions to the kernel (kTLS, e.g.
 * `ssl_conf_command Options KTLS` with a kTLS cipher) and holds nothing of its own: no
 * decrypted bytes pending, no unsent record. Returns why it cannot move now, or NULL.
 */
static const char *
ngx_http_handoff_ktls_unready(ngx_connection_t *c)
{
#if defined(BIO_get_ktls_send) && defined(BIO_get_ktls_recv)
    SSL  *ssl = c->ssl->connection;

    if (!c->ssl->handshaked) {
        return "the handshake is not finished";
    }
    if (!BIO_get_ktls_send(SSL_get_wbio(ssl))) {
        return "kTLS is off for sending (needs ssl_conf_command Options KTLS, a kTLS cipher "
               "and the kernel's tls module)";
    }
    if (!BIO_get_ktls_recv(SSL_get_rbio(ssl))) {
        return "kTLS is off for receiving (OpenSSL 3.0 has none for TLS 1.3)";
    }
    if (c->buffered || SSL_pending(ssl) != 0) {
        return "OpenSSL holds unsent or unread data";
    }
    return NULL;
#else
    return "this OpenSSL has no kTLS";
#endif
}


/* Whether the TLS state is all in the kernel; if not, says why (once per connection: the
 * first request's answer lasts, except for the transient "OpenSSL holds data"). */
static ngx_uint_t
ngx_http_handoff_tls_movable(ngx_http_request_t *r)
{
    ngx_uint_t         level;
    const char        *why;
    ngx_connection_t  *c = r->connection;

    why = ngx_http_handoff_ktls_unready(c);
    if (why == NULL) {
        return 1;
    }
    level = c->requests == 1 ? NGX_LOG_INFO : NGX_LOG_DEBUG;
    ngx_log_error(level, c->log, 0,
                  "handoff: %s connection served here: %s",
                  SSL_get_version(c->ssl->connection), why);
    return 0;
}

#endif


static ngx_uint_t
ngx_http_handoff_eligible(ngx_http_request_t *r)
{
    ngx_http_handoff_conn_ctx_t  *cctx;

    if (r != r->main || !(r->method & (NGX_HTTP_GET | NGX_HTTP_HEAD))
        || r->headers_in.content_length_n > 0 || r->headers_in.chunked
        || r->http_version < NGX_HTTP_VERSION_10)
    {
        return 0;
    }
#if (NGX_HTTP_SSL)
    if (r->connection->ssl && !ngx_http_handoff_tls_movable(r)) {
        return 0;     /* the TLS state must be all in the kernel for the agent to move it */
    }
#endif
#if (NGX_HTTP_V2)
    if (r->stream) {
        return 0;
    }
#endif
    cctx = ngx_http_handoff_conn_ctx(r->connection);
    return cctx == NULL || cctx->kind != XO_CONN_IN;
}


static ngx_int_t
ngx_http_handoff_out_handler(ngx_http_request_t *r)
{
    ngx_str_t                     *targets, preread;
    xo_local_msg_t                 msg;
    ngx_pool_cleanup_t            *cln;
    ngx_http_handoff_req_ctx_t    *ctx;
    ngx_http_handoff_loc_conf_t   *hlcf;
    ngx_http_handoff_main_conf_t  *hmcf;

    hlcf = ngx_http_get_module_loc_conf(r, ngx_http_handoff_module);
    hmcf = ngx_http_get_module_main_conf(r, ngx_http_handoff_module);

    if (!ngx_http_handoff_eligible(r)) {
        return NGX_DECLINED;
    }
    ctx = ngx_http_handoff_req_ctx(r);
    if (ctx == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    hlcf->count++;
    if (hlcf->freq > 1 && hlcf->count % hlcf->freq != 0) {
        ctx->status = ngx_http_handoff_st_local;
        return NGX_DECLINED;
    }

    targets = hlcf->targets->elts;
    ctx->target = targets[hlcf->next++ % hlcf->targets->nelts];

    if (hmcf->agent_path.len == 0 || xo_link_state() != XO_LINK_READY
        || ngx_http_handoff_rebuild(r, &preread) != NGX_OK)
    {
        ctx->status = ngx_http_handoff_st_fallback;
        return NGX_DECLINED;
    }

    cln = ngx_pool_cleanup_add(r->pool, 0);
    if (cln == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }
    cln->handler = ngx_http_handoff_request_cleanup;
    cln->data = ctx;

    ngx_memzero(&msg, sizeof(msg));
    msg.type = XO_MSG_OFFLOAD;
    msg.request_id = ++ngx_http_handoff_last_id;
    msg.target.data = ctx->target.data;
    msg.target.len = ctx->target.len;
    msg.preread.data = preread.data;
    msg.preread.len = preread.len;
    msg.app.data = hmcf->app.data;
    msg.app.len = hmcf->app.len;

    /* the fd stays ours (and untouched) until OffloadResult */
    if (xo_link_send(&msg, r->connection->fd) != NGX_OK) {
        ctx->status = ngx_http_handoff_st_fallback;
        return NGX_DECLINED;
    }

    ctx->request_id = msg.request_id;
    ctx->waiting = 1;
    ngx_queue_insert_tail(&ngx_http_handoff_waiting, &ctx->queue);
    ctx->timer.handler = ngx_http_handoff_offload_timeout;
    ctx->timer.data = ctx;
    ctx->timer.log = r->connection->log;
    ngx_add_timer(&ctx->timer, hlcf->timeout);

    r->main->count++;
    r->read_event_handler = ngx_http_block_reading;
    r->write_event_handler = ngx_http_request_empty_handler;
    return NGX_DONE;
}


static void
ngx_http_handoff_offload_result(xo_local_msg_t *msg)
{
    ngx_queue_t                 *q;
    ngx_connection_t            *c;
    ngx_http_request_t          *r;
    ngx_http_handoff_req_ctx_t  *ctx;

    for (q = ngx_queue_head(&ngx_http_handoff_waiting);
         q != ngx_queue_sentinel(&ngx_http_handoff_waiting);
         q = ngx_queue_next(q))
    {
        ctx = ngx_queue_data(q, ngx_http_handoff_req_ctx_t, queue);
        if (ctx->request_id == msg->request_id) {
            break;
        }
    }
    if (q == ngx_queue_sentinel(&ngx_http_handoff_waiting)) {
        ngx_log_error(NGX_LOG_WARN, ngx_cycle->log, 0,
                      "handoff: result for unknown or timed out request %uL", msg->request_id);
        return;
    }

    ngx_http_handoff_stop_waiting(ctx);
    r = ctx->r;
    c = r->connection;

    if (!msg->flag) {
        ngx_log_error(NGX_LOG_INFO, c->log, 0,
                      "handoff: agent did not offload to %V (reason %uD: %*s), serving locally",
                      &ctx->target, msg->reason, msg->detail.len, msg->detail.data);
        ctx->status = ngx_http_handoff_st_fallback;
        ngx_http_handoff_serve_locally(r);
        return;
    }

    ctx->status = ngx_http_handoff_st_out;
    ctx->handoff_id.data = ngx_pnalloc(r->pool, msg->handoff_id.len);
    if (ctx->handoff_id.data) {
        ngx_memcpy(ctx->handoff_id.data, msg->handoff_id.data, msg->handoff_id.len);
        ctx->handoff_id.len = msg->handoff_id.len;
    }

    /* the connection now lives on the target: let go of it without FIN, RST or linger */
    ngx_http_handoff_detach(c);
#if (NGX_HTTP_SSL)
    if (c->ssl) {
        /* and without a close_notify: the TLS session goes on in the kernel, elsewhere */
        c->ssl->no_send_shutdown = 1;
        c->ssl->no_wait_shutdown = 1;
    }
#endif
    r->keepalive = 0;
    r->lingering_close = 0;
    c->timedout = 0;
    ngx_http_finalize_request(r, NGX_ERROR);
    ngx_http_run_posted_requests(c);
}


/* ---- handoff_in: backend, and connections returned to the frontend ------------------- */

/* Does the client expect the connection to stay open after this response? */
static ngx_uint_t
ngx_http_handoff_client_keepalive(ngx_http_request_t *r)
{
    switch (r->headers_in.connection_type) {
    case NGX_HTTP_CONNECTION_CLOSE:
        return 0;
    case NGX_HTTP_CONNECTION_KEEP_ALIVE:
        return 1;
    default:
        return r->http_version > NGX_HTTP_VERSION_10;
    }
}


static void
ngx_http_handoff_giveback_idle(ngx_event_t *ev)
{
    ngx_http_handoff_conn_ctx_t  *cctx = ev->data;
    ngx_http_handoff_giveback_t  *gb = cctx->giveback;
    ngx_connection_t             *c = cctx->c;

    if (!c->idle) {
        /* a pipelined request started after all: keep serving here */
        cctx->giveback = NULL;
        close(gb->fd);
        ngx_free(gb);
        if (ngx_handle_read_event(c->read, 0) != NGX_OK) {
            ngx_http_close_connection(c);
        }
        return;
    }
    ngx_http_handoff_detach(c);
    ngx_http_close_connection(c);    /* the pool cleanup sends the give-back */
}


/*
 * Log phase: a handed-in request is answered. Give the connection back (to the frontend, via
 * the agent) once nginx is done with it. The socket is dup'ed here because, on the closing
 * path (worker exiting), nginx closes its fd right after this handler.
 */
static ngx_int_t
ngx_http_handoff_log_handler(ngx_http_request_t *r)
{
    ngx_connection_t              *c = r->connection;
    ngx_http_handoff_conn_ctx_t   *cctx;
    ngx_http_handoff_giveback_t   *gb;

    cctx = ngx_http_handoff_conn_ctx(c);
    if (cctx == NULL || cctx->kind != XO_CONN_IN || cctx->giveback || r != r->main
        || c->error || c->read->eof || c->buffered
        || r->header_in->pos < r->header_in->last
        || !ngx_http_handoff_client_keepalive(r)
        || xo_link_state() != XO_LINK_READY)
    {
        return NGX_OK;
    }

    gb = ngx_alloc(sizeof(ngx_http_handoff_giveback_t) + cctx->handoff_id.len, c->log);
    if (gb == NULL) {
        return NGX_OK;
    }
    ngx_memzero(gb, sizeof(*gb));
    gb->fd = fcntl(c->fd, F_DUPFD_CLOEXEC, 0);
    if (gb->fd == -1) {
        ngx_log_error(NGX_LOG_ERR, c->log, ngx_errno, "handoff: dup() failed, keeping it");
        ngx_free(gb);
        return NGX_OK;
    }
    gb->ls = c->listening;
    gb->handoff_id.data = gb->id;
    gb->handoff_id.len = cctx->handoff_id.len;
    ngx_memcpy(gb->id, cctx->handoff_id.data, cctx->handoff_id.len);
    cctx->giveback = gb;

    ngx_http_handoff_detach(c);
    cctx->giveback_ev.handler = ngx_http_handoff_giveback_idle;
    cctx->giveback_ev.data = cctx;
    cctx->giveback_ev.log = c->log;
    ngx_post_event(&cctx->giveback_ev, &ngx_posted_events);
    return NGX_OK;
}


void
ngx_http_handoff_conn_cleanup(void *data)
{
    ngx_http_handoff_conn_ctx_t  *cctx = data;
    ngx_http_handoff_giveback_t  *gb = cctx->giveback;

    if (cctx->giveback_ev.posted) {
        ngx_delete_posted_event(&cctx->giveback_ev);
    }
    if (gb) {
        cctx->giveback = NULL;
        ngx_http_handoff_giveback_send(gb, ngx_cycle->log);
    }
}


static void
ngx_http_handoff_giveback_free(ngx_http_handoff_giveback_t *gb, ngx_uint_t readopt)
{
    ngx_str_t  none = ngx_null_string;

    if (gb->timer.timer_set) {
        ngx_del_timer(&gb->timer);
    }
    if (gb->queue.next) {
        ngx_queue_remove(&gb->queue);
    }
    if (readopt && !ngx_exiting && !ngx_terminate) {
        /* the agent did not take it: keep serving the client here */
        (void) ngx_http_handoff_adopt(gb->fd, gb->ls, XO_CONN_IN, &gb->handoff_id, &none,
                                      ngx_cycle->log);
    } else {
        close(gb->fd);
    }
    ngx_free(gb);
}


static void
ngx_http_handoff_giveback_timeout(ngx_event_t *ev)
{
    ngx_http_handoff_giveback_t  *gb = ev->data;

    /* the agent holds the socket (the fd was delivered with the frame): drop our copy */
    ngx_log_error(NGX_LOG_WARN, ev->log, 0, "handoff: no answer to give-back %V",
                  &gb->handoff_id);
    ngx_http_handoff_giveback_free(gb, 0);
}


static void
ngx_http_handoff_giveback_send(ngx_http_handoff_giveback_t *gb, ngx_log_t *log)
{
    xo_local_msg_t                 msg;
    ngx_http_handoff_main_conf_t  *hmcf;

    ngx_memzero(&msg, sizeof(msg));
    msg.type = XO_MSG_GIVE_BACK;
    msg.handoff_id.data = gb->handoff_id.data;
    msg.handoff_id.len = gb->handoff_id.len;

    if (xo_link_send(&msg, gb->fd) != NGX_OK) {
        ngx_http_handoff_giveback_free(gb, 1);
        return;
    }
    hmcf = ngx_http_cycle_get_module_main_conf(ngx_cycle, ngx_http_handoff_module);
    ngx_queue_insert_tail(&ngx_http_handoff_givebacks, &gb->queue);
    gb->timer.handler = ngx_http_handoff_giveback_timeout;
    gb->timer.data = gb;
    gb->timer.log = log;
    /* not cancelable: an exiting worker waits for the answer before it goes */
    ngx_add_timer(&gb->timer, hmcf->giveback_timeout);
}


static void
ngx_http_handoff_giveback_result(xo_local_msg_t *msg)
{
    ngx_queue_t                  *q;
    ngx_http_handoff_giveback_t  *gb;

    for (q = ngx_queue_head(&ngx_http_handoff_givebacks);
         q != ngx_queue_sentinel(&ngx_http_handoff_givebacks);
         q = ngx_queue_next(q))
    {
        gb = ngx_queue_data(q, ngx_http_handoff_giveback_t, queue);
        if (gb->handoff_id.len == msg->handoff_id.len
            && ngx_memcmp(gb->handoff_id.data, msg->handoff_id.data, msg->handoff_id.len) == 0)
        {
            if (!msg->flag) {
                ngx_log_error(NGX_LOG_WARN, ngx_cycle->log, 0,
                              "handoff: agent refused give-back %V: %*s, serving it here",
                              &gb->handoff_id, msg->detail.len, msg->detail.data);
            }
            ngx_http_handoff_giveback_free(gb, !msg->flag);
            return;
        }
    }
    ngx_log_error(NGX_LOG_WARN, ngx_cycle->log, 0, "handoff: result for unknown give-back %*s",
                  msg->handoff_id.len, msg->handoff_id.data);
}


static ngx_listening_t *
ngx_http_handoff_in_listener_for(ngx_socket_t fd)
{
    ngx_sockaddr_t  sa;
    socklen_t       len = sizeof(sa);

    if (getsockname(fd, &sa.sockaddr, &len) == -1) {
        return NULL;
    }
    return sa.sockaddr.sa_family == AF_INET6 ? ngx_http_handoff_in_listener6
                                             : ngx_http_handoff_in_listener4;
}


static void
ngx_http_handoff_adopt_msg(xo_local_msg_t *msg, ngx_socket_t fd, xo_conn_kind_e kind)
{
    ngx_str_t                     id, preread;
    ngx_listening_t              *ls;
    ngx_http_handoff_giveback_t  *gb;

    id.data = (u_char *) msg->handoff_id.data;
    id.len = msg->handoff_id.len;
    preread.data = (u_char *) msg->preread.data;
    preread.len = msg->preread.len;

    ls = kind == XO_CONN_IN ? NULL : ngx_http_handoff_listener_for(fd);
    if (ls == NULL) {
        ls = ngx_http_handoff_in_listener_for(fd);
    }
    if (ls != NULL) {
        (void) ngx_http_handoff_adopt(fd, ls, kind, &id, &preread, ngx_cycle->log);
        return;
    }

    ngx_log_error(NGX_LOG_ERR, ngx_cycle->log, 0,
                  "handoff: connection %V came in, but no server has \"handoff_in on\" "
                  "(or listens on its address): giving it back", &id);
    gb = ngx_alloc(sizeof(ngx_http_handoff_giveback_t) + id.len, ngx_cycle->log);
    if (gb == NULL) {
        close(fd);
        return;
    }
    ngx_memzero(gb, sizeof(*gb));
    gb->fd = fd;
    gb->handoff_id.data = gb->id;
    gb->handoff_id.len = id.len;
    ngx_memcpy(gb->id, id.data, id.len);
    ngx_http_handoff_giveback_send(gb, ngx_cycle->log);
}


static void
ngx_http_handoff_on_message(xo_local_msg_t *msg, ngx_socket_t fd)
{
    switch (msg->type) {
    case XO_MSG_OFFLOAD_RESULT:
        ngx_http_handoff_offload_result(msg);
        break;
    case XO_MSG_GIVE_BACK_RESULT:
        ngx_http_handoff_giveback_result(msg);
        break;
    case XO_MSG_HANDED_IN:
    case XO_MSG_RETURNED:
        if (fd != -1) {
            ngx_http_handoff_adopt_msg(msg, fd, msg->type == XO_MSG_HANDED_IN
                                                ? XO_CONN_IN : XO_CONN_RETURNED);
            return;
        }
        ngx_log_error(NGX_LOG_INFO, ngx_cycle->log, 0,
                      "handoff: connection %*s ended while offloaded (reason %uD)",
                      msg->handoff_id.len, msg->handoff_id.data, msg->reason);
        return;
    default:
        ngx_log_error(NGX_LOG_WARN, ngx_cycle->log, 0,
                      "handoff: unexpected message %d from agent", (int) msg->type);
        break;
    }
    if (fd != -1) {
        close(fd);
    }
}


/* The agent went away: nothing waiting on it will get an answer. */
static void
ngx_http_handoff_on_down(void)
{
    ngx_queue_t                  *q;
    ngx_http_handoff_req_ctx_t   *ctx;
    ngx_http_handoff_giveback_t  *gb;

    while (!ngx_queue_empty(&ngx_http_handoff_waiting)) {
        q = ngx_queue_head(&ngx_http_handoff_waiting);
        ctx = ngx_queue_data(q, ngx_http_handoff_req_ctx_t, queue);
        ngx_http_handoff_stop_waiting(ctx);
        ctx->status = ngx_http_handoff_st_fallback;
        ngx_http_handoff_serve_locally(ctx->r);
    }
    while (!ngx_queue_empty(&ngx_http_handoff_givebacks)) {
        q = ngx_queue_head(&ngx_http_handoff_givebacks);
        gb = ngx_queue_data(q, ngx_http_handoff_giveback_t, queue);
        ngx_http_handoff_giveback_free(gb, 0);
    }
}


static ngx_uint_t
ngx_http_handoff_busy(void)
{
    return !ngx_queue_empty(&ngx_http_handoff_waiting)
           || !ngx_queue_empty(&ngx_http_handoff_givebacks);
}


/* ---- set-up -------------------------------------------------------------------------- */

static ngx_int_t
ngx_http_handoff_init(ngx_conf_t *cf)
{
    ngx_http_handler_pt        *h;
    ngx_http_core_main_conf_t  *cmcf;

    cmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_core_module);
    h = ngx_array_push(&cmcf->phases[NGX_HTTP_LOG_PHASE].handlers);
    if (h == NULL) {
        return NGX_ERROR;
    }
    *h = ngx_http_handoff_log_handler;
    return NGX_OK;
}


static ngx_uint_t
ngx_http_handoff_server_in(ngx_http_core_srv_conf_t *cscf)
{
    ngx_http_handoff_srv_conf_t  *hscf;

    hscf = cscf->ctx->srv_conf[ngx_http_handoff_module.ctx_index];
    return hscf->in;
}


/* The first listener of the family whose default server has "handoff_in on". */
static ngx_listening_t *
ngx_http_handoff_find_in_listener(ngx_cycle_t *cycle, int family)
{
    ngx_uint_t           i, j;
    ngx_listening_t     *ls;
    ngx_http_port_t     *port;
    ngx_http_in_addr_t  *addr;
#if (NGX_HAVE_INET6)
    ngx_http_in6_addr_t *addr6;
#endif

    ls = cycle->listening.elts;
    for (i = 0; i < cycle->listening.nelts; i++) {
        if (ls[i].handler != ngx_http_init_connection || ls[i].servers == NULL
            || ls[i].sockaddr->sa_family != family)
        {
            continue;
        }
        port = ls[i].servers;
        for (j = 0; j < port->naddrs; j++) {
#if (NGX_HAVE_INET6)
            if (ls[i].sockaddr->sa_family == AF_INET6) {
                addr6 = port->addrs;
                if (ngx_http_handoff_server_in(addr6[j].conf.default_server)) {
                    return &ls[i];
                }
                continue;
            }
#endif
            addr = port->addrs;
            if (ngx_http_handoff_server_in(addr[j].conf.default_server)) {
                return &ls[i];
            }
        }
    }
    return NULL;
}


static ngx_int_t
ngx_http_handoff_init_process(ngx_cycle_t *cycle)
{
    ngx_http_handoff_main_conf_t  *hmcf;

    ngx_queue_init(&ngx_http_handoff_waiting);
    ngx_queue_init(&ngx_http_handoff_givebacks);

    hmcf = ngx_http_cycle_get_module_main_conf(cycle, ngx_http_handoff_module);
    if (hmcf == NULL || hmcf->agent_path.len == 0) {
        return NGX_OK;
    }
    ngx_http_handoff_in_listener4 = ngx_http_handoff_find_in_listener(cycle, AF_INET);
    ngx_http_handoff_in_listener6 = ngx_http_handoff_find_in_listener(cycle, AF_INET6);
    if (ngx_http_handoff_in_listener4 || ngx_http_handoff_in_listener6) {
        ngx_log_error(NGX_LOG_INFO, cycle->log, 0,
                      "handoff: handed-in connections served by the server of %V and %V",
                      ngx_http_handoff_in_listener4
                      ? &ngx_http_handoff_in_listener4->addr_text : &ngx_http_handoff_none,
                      ngx_http_handoff_in_listener6
                      ? &ngx_http_handoff_in_listener6->addr_text : &ngx_http_handoff_none);
    }
    return xo_link_start(cycle, hmcf, ngx_http_handoff_on_message, ngx_http_handoff_on_down,
                         ngx_http_handoff_busy);
}


static void
ngx_http_handoff_exit_process(ngx_cycle_t *cycle)
{
    ngx_http_handoff_main_conf_t  *hmcf;

    hmcf = ngx_http_cycle_get_module_main_conf(cycle, ngx_http_handoff_module);
    if (hmcf != NULL && hmcf->agent_path.len) {
        xo_link_stop();
    }
}
