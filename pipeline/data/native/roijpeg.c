/* Region-of-interest JPEG decoding through the libjpeg API of libjpeg-turbo (>= 1.5), loaded by
 * pipeline/data/jpeg.py with ctypes (no Python headers needed to build it; `make setup` compiles it).
 *
 * What it saves against a full decode: rows below the region are never entropy-decoded (the decode stops
 * there), rows above it are entropy-decoded only (jpeg_skip_scanlines skips their IDCT, upsampling and colour
 * conversion), and columns outside it get no IDCT / colour conversion (jpeg_crop_scanline, which widens the
 * column range to whole iMCUs). scale_denom 2, 4 or 8 makes the IDCT itself output 1/2..1/8 of the pixels.
 *
 * Every entry point returns 0 on success, else -1 with libjpeg's message in `err` (a corrupt JPEG must fail
 * the caller with a message, never abort the process: libjpeg's default error handler calls exit()).
 */
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jpeglib.h>
#include <jerror.h>

struct roi_error {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
    char *msg;
    int msg_len;
};

static void roi_error_exit(j_common_ptr cinfo) {
    struct roi_error *e = (struct roi_error *)cinfo->err;
    char buf[JMSG_LENGTH_MAX];
    (*cinfo->err->format_message)(cinfo, buf);
    if (e->msg && e->msg_len > 0) {
        strncpy(e->msg, buf, (size_t)e->msg_len - 1);
        e->msg[e->msg_len - 1] = '\0';
    }
    longjmp(e->jump, 1);
}

/* Corrupt-data warnings (a truncated file, extraneous bytes) are not fatal in libjpeg and not here either,
 * as with torchvision and Pillow; they are simply not printed to stderr. */
static void roi_emit_message(j_common_ptr cinfo, int level) {
    (void)cinfo;
    (void)level;
}

static void set_error(char *err, int err_len, const char *text) {
    if (err && err_len > 0) {
        strncpy(err, text, (size_t)err_len - 1);
        err[err_len - 1] = '\0';
    }
}

/* info[0..3] = width, height, components, libjpeg colour space (J_COLOR_SPACE) of the file. */
int roi_header(const unsigned char *data, unsigned long size, int *info, char *err, int err_len) {
    struct jpeg_decompress_struct cinfo;
    struct roi_error jerr;
    cinfo.err = jpeg_std_error(&jerr.pub);
    jerr.pub.error_exit = roi_error_exit;
    jerr.pub.emit_message = roi_emit_message;
    jerr.msg = err;
    jerr.msg_len = err_len;
    if (setjmp(jerr.jump)) {
        jpeg_destroy_decompress(&cinfo);
        return -1;
    }
    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, data, size);
    jpeg_read_header(&cinfo, TRUE);
    info[0] = (int)cinfo.image_width;
    info[1] = (int)cinfo.image_height;
    info[2] = cinfo.num_components;
    info[3] = (int)cinfo.jpeg_color_space;
    jpeg_destroy_decompress(&cinfo);
    return 0;
}

/* The arguments every region decode shares: a libjpeg scale (1/denom) and a non-empty region. 0 or -1. */
static int check_region(int denom, int x, int y, int w, int h, char *err, int err_len) {
    if (!(denom == 1 || denom == 2 || denom == 4 || denom == 8)) {
        set_error(err, err_len, "scale denominator must be 1, 2, 4 or 8");
        return -1;
    }
    if (x < 0 || y < 0 || w <= 0 || h <= 0) {
        set_error(err, err_len, "region must have x, y >= 0 and w, h > 0");
        return -1;
    }
    return 0;
}

/* Decodes columns [x, x + w) and rows [y, y + h) of the image scaled by 1/denom (coordinates in the scaled
 * image) as RGB (channels 3) or RGBX (channels 4: the fourth byte is padding, the layout torch's vectorised
 * uint8 resize works in, so it need not repack) into `out` (row-major, `cap` bytes). libjpeg widens the column range to iMCU boundaries, so the
 * window written is win[0..3] = (x0, y0, width, height) in scaled coordinates, x0 <= x, x0 + width >= x + w,
 * y0 == y, height == h; `out` holds height rows of width * channels bytes. denom: 1, 2, 4 or 8. */
int roi_decode(const unsigned char *data, unsigned long size, int denom, int x, int y, int w, int h, int channels,
               unsigned char *out, unsigned long cap, int *win, char *err, int err_len) {
    struct jpeg_decompress_struct cinfo;
    struct roi_error jerr;
    JDIMENSION xoff, cw;
    unsigned long need, stride;
    int row;
    if (check_region(denom, x, y, w, h, err, err_len) < 0)
        return -1;
    if (channels != 3 && channels != 4) {
        set_error(err, err_len, "channels must be 3 (RGB) or 4 (RGBX)");
        return -1;
    }
    cinfo.err = jpeg_std_error(&jerr.pub);
    jerr.pub.error_exit = roi_error_exit;
    jerr.pub.emit_message = roi_emit_message;
    jerr.msg = err;
    jerr.msg_len = err_len;
    if (setjmp(jerr.jump)) {
        jpeg_destroy_decompress(&cinfo);
        return -1;
    }
    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, data, size);
    jpeg_read_header(&cinfo, TRUE);
    cinfo.out_color_space = channels == 4 ? JCS_EXT_RGBX : JCS_RGB;
    cinfo.scale_num = 1;
    cinfo.scale_denom = (unsigned int)denom;
    jpeg_start_decompress(&cinfo);
    if ((JDIMENSION)(x + w) > cinfo.output_width || (JDIMENSION)(y + h) > cinfo.output_height) {
        set_error(err, err_len, "region lies outside the (scaled) image");
        jpeg_destroy_decompress(&cinfo);
        return -1;
    }
    xoff = (JDIMENSION)x;
    cw = (JDIMENSION)w;
    if (xoff > 0 || cw < cinfo.output_width)
        jpeg_crop_scanline(&cinfo, &xoff, &cw);
    stride = (unsigned long)cw * (unsigned long)channels;
    need = stride * (unsigned long)h;
    if (need > cap) {
        set_error(err, err_len, "output buffer too small for the decoded window");
        jpeg_destroy_decompress(&cinfo);
        return -1;
    }
    if (y > 0 && jpeg_skip_scanlines(&cinfo, (JDIMENSION)y) != (JDIMENSION)y) {
        set_error(err, err_len, "could not skip to the region's first row");
        jpeg_destroy_decompress(&cinfo);
        return -1;
    }
    for (row = 0; row < h;) {
        JSAMPROW ptr = out + (unsigned long)row * stride;
        JDIMENSION got = jpeg_read_scanlines(&cinfo, &ptr, 1);
        if (got == 0) {
            set_error(err, err_len, "decoder returned no row (truncated data)");
            jpeg_destroy_decompress(&cinfo);
            return -1;
        }
        row += (int)got;
    }
    win[0] = (int)xoff;
    win[1] = y;
    win[2] = (int)cw;
    win[3] = h;
    /* The rows below the region are never decoded: abort instead of jpeg_finish_decompress. */
    jpeg_abort_decompress(&cinfo);
    jpeg_destroy_decompress(&cinfo);
    return 0;
}

/* For the per-stage cost breakdown (bench/bench_jpeg.py): decodes the whole image stopping after a stage.
 * stage 0: entropy (Huffman) decoding only, into DCT coefficients (jpeg_read_coefficients);
 * stage 1: + inverse DCT, component planes at their own sampling (raw_data_out, no upsampling);
 * stage 2: + chroma upsampling (out_color_space = YCbCr: libjpeg only copies the planes, no conversion);
 * stage 3: + YCbCr -> RGB colour conversion (a full decode, as roi_decode does over the whole image).
 * Each stage's cost is its time minus the previous stage's. `out` needs width * 3 bytes (one row). */
int roi_stage(const unsigned char *data, unsigned long size, int stage, unsigned char *out, unsigned long cap,
              char *err, int err_len) {
    struct jpeg_decompress_struct cinfo;
    struct roi_error jerr;
    cinfo.err = jpeg_std_error(&jerr.pub);
    jerr.pub.error_exit = roi_error_exit;
    jerr.pub.emit_message = roi_emit_message;
    jerr.msg = err;
    jerr.msg_len = err_len;
    if (setjmp(jerr.jump)) {
        jpeg_destroy_decompress(&cinfo);
        return -1;
    }
    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, data, size);
    jpeg_read_header(&cinfo, TRUE);
    if (stage == 0) {
        jpeg_read_coefficients(&cinfo);
    } else if (stage == 1) {
        JSAMPARRAY planes[MAX_COMPONENTS];
        int ci, lines = cinfo.max_v_samp_factor * DCTSIZE;
        cinfo.raw_data_out = TRUE;
        cinfo.do_fancy_upsampling = FALSE;
        jpeg_start_decompress(&cinfo);
        for (ci = 0; ci < cinfo.num_components; ci++) {
            jpeg_component_info *comp = &cinfo.comp_info[ci];
            planes[ci] = (*cinfo.mem->alloc_sarray)((j_common_ptr)&cinfo, JPOOL_IMAGE,
                                                    comp->width_in_blocks * DCTSIZE,
                                                    (JDIMENSION)(comp->v_samp_factor * DCTSIZE));
        }
        while (cinfo.output_scanline < cinfo.output_height)
            jpeg_read_raw_data(&cinfo, planes, (JDIMENSION)lines);
    } else {
        cinfo.out_color_space = stage == 2 ? JCS_YCbCr : JCS_RGB;
        jpeg_start_decompress(&cinfo);
        if ((unsigned long)cinfo.output_width * 3UL > cap) {
            set_error(err, err_len, "row buffer too small");
            jpeg_destroy_decompress(&cinfo);
            return -1;
        }
        while (cinfo.output_scanline < cinfo.output_height) {
            JSAMPROW row = out;
            jpeg_read_scanlines(&cinfo, &row, 1);
        }
    }
    jpeg_abort_decompress(&cinfo);
    jpeg_destroy_decompress(&cinfo);
    return 0;
}


/* ------------------------------------------------------------------------------------------------------------
 * Restart markers: a lossless transcode that adds them, a marker scan, and region decoding by stream surgery.
 *
 * A baseline scan without restart markers can only be entropy-decoded from its first byte: Huffman codes have no
 * byte alignment and every block's DC coefficient is coded as a difference from the previous block's. A restart
 * marker (RSTn, 0xFFD0+n) resets the DC predictions and byte-aligns the stream, so each restart interval decodes
 * on its own. rst_transcode rewrites a JPEG's DCT coefficients unchanged (jpeg_read_coefficients ->
 * jpeg_write_coefficients, what `jpegtran -restart` does) with a restart interval, so its decode is the
 * original's, pixel for pixel; with one interval per MCU row, a crop's rows can be cut out of the stream: the
 * headers with the band's height in SOF, then only the entropy-coded intervals of the band's MCU rows, RST
 * markers renumbered from 0, EOI (rst_band). libjpeg decodes that like any JPEG; rows above the band are never
 * Huffman-decoded.
 * ---------------------------------------------------------------------------------------------------------- */

struct rst_error {
    struct jpeg_error_mgr pub;
    jmp_buf *jump;
    char *msg;
    int msg_len;
    int strict;
};

static void rst_error_exit(j_common_ptr cinfo) {
    struct rst_error *e = (struct rst_error *)cinfo->err;
    char buf[JMSG_LENGTH_MAX];
    (*cinfo->err->format_message)(cinfo, buf);
    if (e->msg && e->msg_len > 0)
        snprintf(e->msg, (size_t)e->msg_len, "%s", buf);
    longjmp(*e->jump, 1);
}

/* In strict mode a corrupt-data warning (truncated file, bad Huffman code, ...) is fatal: libjpeg would
 * otherwise fill the missing coefficients with zeros and the transcode would silently keep that damage. */
static void rst_emit_message(j_common_ptr cinfo, int level) {
    struct rst_error *e = (struct rst_error *)cinfo->err;
    if (level < 0 && e->strict) {
        char buf[JMSG_LENGTH_MAX];
        (*cinfo->err->format_message)(cinfo, buf);
        if (e->msg && e->msg_len > 0)
            snprintf(e->msg, (size_t)e->msg_len, "corrupt data: %s", buf);
        longjmp(*e->jump, 1);
    }
}

/* One error manager of the transcode (the source's or the destination's), both jumping to `jump`. */
static struct jpeg_error_mgr *rst_error_init(struct rst_error *e, jmp_buf *jump, char *err, int err_len,
                                             int strict) {
    struct jpeg_error_mgr *pub = jpeg_std_error(&e->pub);
    e->pub.error_exit = rst_error_exit;
    e->pub.emit_message = rst_emit_message;
    e->jump = jump;
    e->msg = err;
    e->msg_len = err_len;
    e->strict = strict;
    return pub;
}

/* A growing malloc'ed destination we own, so an error mid-way can free it (jpeg_mem_dest's buffer is
 * unreachable from outside jdatadst.c until jpeg_finish_compress). */
struct rst_dest {
    struct jpeg_destination_mgr pub;
    unsigned char *buf;
    size_t cap;
    size_t len;
};

static void rst_init_destination(j_compress_ptr cinfo) {
    struct rst_dest *d = (struct rst_dest *)cinfo->dest;
    d->pub.next_output_byte = d->buf;
    d->pub.free_in_buffer = d->cap;
}

static boolean rst_empty_output_buffer(j_compress_ptr cinfo) {
    struct rst_dest *d = (struct rst_dest *)cinfo->dest;
    size_t ncap = d->cap * 2;
    unsigned char *nbuf = (unsigned char *)realloc(d->buf, ncap);
    if (nbuf == NULL)
        ERREXIT1(cinfo, JERR_OUT_OF_MEMORY, 99);
    d->pub.next_output_byte = nbuf + d->cap; /* the whole old buffer was full */
    d->pub.free_in_buffer = ncap - d->cap;
    d->buf = nbuf;
    d->cap = ncap;
    return TRUE;
}

static void rst_term_destination(j_compress_ptr cinfo) {
    struct rst_dest *d = (struct rst_dest *)cinfo->dest;
    d->len = d->cap - d->pub.free_in_buffer;
}

struct rst_ctx {
    struct jpeg_decompress_struct src;
    struct jpeg_compress_struct dst;
    struct rst_error esrc, edst;
    struct rst_dest dest;
    jmp_buf jump;
    int dst_created;
};

void rst_free(void *p) { free(p); }

/* Lossless transcode with restart markers: every restart_rows MCU rows (restart_mcus == 0) or every
 * restart_mcus MCUs (both 0: no restart markers, an optimising transcode only). The coefficients, quantisation tables, sampling factors and colour space are the source's;
 * Huffman tables are optimised; progressive or arithmetic-coded input is written as one baseline (sequential,
 * Huffman) scan. Only the markers decoding needs are written (JFIF for YCbCr/grey, Adobe for RGB/CMYK/YCCK, which
 * is how libjpeg tells the colour space); APPn (EXIF, ICC) and COM are dropped: they do not change decoded
 * pixels. On success *out is a malloc'ed buffer (free with rst_free) of *out_size bytes. strict: any libjpeg
 * corrupt-data warning fails the transcode. Returns 0, or -1 with the reason in err. */
int rst_transcode(const unsigned char *data, unsigned long size, int restart_rows, int restart_mcus, int strict,
                  unsigned char **out, unsigned long *out_size, char *err, int err_len) {
    struct rst_ctx *ctx;
    jvirt_barray_ptr *coefs;
    *out = NULL;
    *out_size = 0;
    if (restart_mcus < 0 || restart_mcus > 65535 || restart_rows < 0 || restart_rows > 65535) {
        set_error(err, err_len, "restart interval must be 0..65535 MCU rows or MCUs");
        return -1;
    }
    ctx = (struct rst_ctx *)calloc(1, sizeof(*ctx));
    if (ctx == NULL) {
        set_error(err, err_len, "out of memory");
        return -1;
    }
    ctx->src.err = rst_error_init(&ctx->esrc, &ctx->jump, err, err_len, strict);
    ctx->dst.err = rst_error_init(&ctx->edst, &ctx->jump, err, err_len, strict);
    if (setjmp(ctx->jump)) {
        jpeg_destroy_decompress(&ctx->src);
        if (ctx->dst_created)
            jpeg_destroy_compress(&ctx->dst);
        free(ctx->dest.buf);
        free(ctx);
        return -1;
    }
    jpeg_create_decompress(&ctx->src);
    jpeg_create_compress(&ctx->dst);
    ctx->dst_created = 1;
    jpeg_mem_src(&ctx->src, data, size);
    jpeg_read_header(&ctx->src, TRUE);
    coefs = jpeg_read_coefficients(&ctx->src);
    jpeg_copy_critical_parameters(&ctx->src, &ctx->dst);
    ctx->dst.optimize_coding = TRUE;
    if (restart_mcus > 0) {
        ctx->dst.restart_interval = (unsigned int)restart_mcus;
        ctx->dst.restart_in_rows = 0;
    } else {
        ctx->dst.restart_interval = 0;
        ctx->dst.restart_in_rows = restart_rows;
    }
    ctx->dest.cap = size + 4096;
    ctx->dest.buf = (unsigned char *)malloc(ctx->dest.cap);
    if (ctx->dest.buf == NULL)
        ERREXIT1(&ctx->dst, JERR_OUT_OF_MEMORY, 98);
    ctx->dest.pub.init_destination = rst_init_destination;
    ctx->dest.pub.empty_output_buffer = rst_empty_output_buffer;
    ctx->dest.pub.term_destination = rst_term_destination;
    ctx->dst.dest = &ctx->dest.pub;
    jpeg_write_coefficients(&ctx->dst, coefs);
    jpeg_finish_compress(&ctx->dst);
    jpeg_finish_decompress(&ctx->src);
    jpeg_destroy_compress(&ctx->dst);
    jpeg_destroy_decompress(&ctx->src);
    *out = ctx->dest.buf;
    *out_size = (unsigned long)ctx->dest.len;
    free(ctx);
    return 0;
}

/* Geometry of a JPEG's (first) scan, from its markers. */
struct rst_geom {
    int width, height, ncomp, max_h, max_v;
    int mcu_w, mcu_h, mcus_per_row, mcu_rows;
    int restart_interval;  /* MCUs per interval, 0: no restart markers */
    int sequential;        /* SOF0/SOF1: baseline or extended sequential, Huffman-coded */
    int interleaved;       /* one scan holds every component (always true of a 1-component image) */
    int single_scan;       /* the scan ends at EOI */
    unsigned long sof_pos; /* offset of the SOF segment's precision byte (height follows, then width) */
    unsigned long scan_start, scan_end; /* entropy-coded data [scan_start, scan_end); scan_end is the next marker */
    long n_markers;        /* RSTn markers found in the scan */
    int numbered;          /* the k-th marker is RST(k mod 8) */
};

#define RST_SCAN_ERR(...)                                                                                          \
    do {                                                                                                           \
        if (err && err_len > 0)                                                                                    \
            snprintf(err, (size_t)err_len, __VA_ARGS__);                                                           \
        return -2;                                                                                                 \
    } while (0)

#define RST_ERR(...)                                                                                               \
    do {                                                                                                           \
        if (err && err_len > 0)                                                                                    \
            snprintf(err, (size_t)err_len, __VA_ARGS__);                                                           \
        return -1;                                                                                                 \
    } while (0)

/* Parses the markers up to the first SOS, then scans its entropy-coded data for RSTn markers (memchr for 0xFF;
 * 0xFF00 is a stuffed data byte, 0xFFFF fill), storing up to `cap` marker offsets (the offset of their 0xFF).
 * headers_if_no_dri: stop after the headers when the scan cannot be addressable (no DRI, or not sequential).
 * Returns 0, -1 with the reason in err for headers this parser refuses (not a JPEG, truncated or malformed
 * segments), -2 for truncated entropy-coded data. */
static int rst_parse(const unsigned char *d, unsigned long n, struct rst_geom *g, unsigned long *offs, long cap,
                     int headers_if_no_dri, char *err, int err_len) {
    unsigned long p = 2;
    int saw_sof = 0, comps_in_scan = 0, ci;
    memset(g, 0, sizeof(*g));
    if (n < 4 || d[0] != 0xFF || d[1] != 0xD8)
        RST_ERR("not a JPEG (no SOI marker)");
    for (;;) {
        unsigned int m, len;
        unsigned long seg;
        if (p >= n)
            RST_ERR("truncated JPEG header (no SOS marker)");
        if (d[p] != 0xFF)
            RST_ERR("corrupt JPEG header: no marker at byte %lu", p);
        while (p < n && d[p] == 0xFF)
            p++;
        if (p >= n)
            RST_ERR("truncated JPEG header (no SOS marker)");
        m = d[p++];
        if (m == 0xD8 || m == 0x01 || (m >= 0xD0 && m <= 0xD7))
            continue; /* markers without a segment */
        if (m == 0xD9)
            RST_ERR("corrupt JPEG: EOI before any SOS marker");
        if (p + 2 > n)
            RST_ERR("truncated JPEG header (marker 0x%02X)", m);
        len = ((unsigned int)d[p] << 8) | d[p + 1];
        if (len < 2 || p + len > n)
            RST_ERR("truncated JPEG header (segment of marker 0x%02X)", m);
        seg = p + 2;
        if (m >= 0xC0 && m <= 0xCF && m != 0xC4 && m != 0xC8 && m != 0xCC) { /* SOFn */
            if (len < 8)
                RST_ERR("corrupt JPEG: short SOF segment");
            g->sequential = (m == 0xC0 || m == 0xC1);
            g->sof_pos = seg;
            g->height = (d[seg + 1] << 8) | d[seg + 2];
            g->width = (d[seg + 3] << 8) | d[seg + 4];
            g->ncomp = d[seg + 5];
            if (g->ncomp < 1 || g->ncomp > 4 || len < 8 + 3 * (unsigned int)g->ncomp)
                RST_ERR("corrupt JPEG: bad SOF component count");
            g->max_h = g->max_v = 1;
            for (ci = 0; ci < g->ncomp; ci++) {
                int hv = d[seg + 7 + 3 * ci], hs = hv >> 4, vs = hv & 15;
                if (hs < 1 || hs > 4 || vs < 1 || vs > 4)
                    RST_ERR("corrupt JPEG: bad sampling factors");
                if (hs > g->max_h)
                    g->max_h = hs;
                if (vs > g->max_v)
                    g->max_v = vs;
            }
            saw_sof = 1;
        } else if (m == 0xDD) { /* DRI */
            if (len < 4)
                RST_ERR("corrupt JPEG: short DRI segment");
            g->restart_interval = (d[seg] << 8) | d[seg + 1];
        } else if (m == 0xDA) { /* SOS */
            if (len < 3)
                RST_ERR("corrupt JPEG: short SOS segment");
            comps_in_scan = d[seg];
            g->scan_start = p + len;
            break;
        }
        p += len;
    }
    if (!saw_sof)
        RST_ERR("corrupt JPEG: SOS before SOF");
    if (g->width <= 0 || g->height <= 0)
        RST_ERR("unsupported JPEG: zero image dimension (DNL)");
    g->interleaved = (comps_in_scan == g->ncomp);
    if (g->ncomp == 1) { /* a non-interleaved scan: one block an MCU, whatever the sampling factors */
        g->mcu_w = g->mcu_h = 8;
    } else {
        g->mcu_w = 8 * g->max_h;
        g->mcu_h = 8 * g->max_v;
    }
    g->mcus_per_row = (g->width + g->mcu_w - 1) / g->mcu_w;
    g->mcu_rows = (g->height + g->mcu_h - 1) / g->mcu_h;
    g->numbered = 1;
    if (headers_if_no_dri && (g->restart_interval == 0 || !g->sequential))
        return 0; /* not addressable whatever the scan holds: a decode need not pay for scanning it */
    p = g->scan_start;
    for (;;) {
        const unsigned char *f = p < n ? (const unsigned char *)memchr(d + p, 0xFF, n - p) : NULL;
        unsigned int b;
        if (f == NULL)
            RST_SCAN_ERR("truncated JPEG: entropy-coded data ends without an EOI marker");
        p = (unsigned long)(f - d);
        if (p + 1 >= n)
            RST_SCAN_ERR("truncated JPEG: entropy-coded data ends without an EOI marker");
        b = d[p + 1];
        if (b == 0x00) {
            p += 2;
        } else if (b == 0xFF) {
            p += 1;
        } else if (b >= 0xD0 && b <= 0xD7) {
            if (g->n_markers < cap)
                offs[g->n_markers] = p;
            if ((long)(b - 0xD0) != (g->n_markers & 7))
                g->numbered = 0;
            g->n_markers++;
            p += 2;
        } else {
            g->scan_end = p;
            g->single_scan = (b == 0xD9);
            break;
        }
    }
    return 0;
}

/* How a crop can be cut out of the stream (one interleaved baseline scan, the marker count and numbering its
 * geometry implies): 1 (RST_ROWS) when every restart interval is whole MCU rows (the crop's rows are cut out,
 * full width), 2 (RST_RECT) when every MCU row is a whole number of intervals of fewer MCUs (the crop's rows and
 * columns are cut out: a rectangle), else 0. */
#define RST_ROWS 1
#define RST_RECT 2
static int rst_addressable(const struct rst_geom *g) {
    long total, intervals;
    if (!g->sequential || !g->interleaved || !g->single_scan || !g->numbered || g->restart_interval <= 0)
        return 0;
    total = (long)g->mcus_per_row * g->mcu_rows;
    intervals = (total + g->restart_interval - 1) / g->restart_interval;
    if (g->n_markers != intervals - 1)
        return 0;
    if (g->restart_interval % g->mcus_per_row == 0)
        return RST_ROWS;
    if (g->mcus_per_row % g->restart_interval == 0)
        return RST_RECT;
    return 0;
}

/* geom[0..15] = width, height, components, max_h, max_v, mcu_w, mcu_h, mcus_per_row, mcu_rows,
 * restart_interval, sequential, interleaved, single_scan, addressable, scan_start, scan_end; offsets[0..cap) the
 * byte offsets of the RSTn markers. Returns the number of markers (may exceed cap: call again with more room), or
 * -1 with the reason in err. */
long rst_scan(const unsigned char *data, unsigned long size, long *geom, unsigned long *offsets, long cap,
              char *err, int err_len) {
    struct rst_geom g;
    if (rst_parse(data, size, &g, offsets, cap, 0, err, err_len) < 0)
        return -1;
    geom[0] = g.width;
    geom[1] = g.height;
    geom[2] = g.ncomp;
    geom[3] = g.max_h;
    geom[4] = g.max_v;
    geom[5] = g.mcu_w;
    geom[6] = g.mcu_h;
    geom[7] = g.mcus_per_row;
    geom[8] = g.mcu_rows;
    geom[9] = g.restart_interval;
    geom[10] = g.sequential;
    geom[11] = g.interleaved;
    geom[12] = g.single_scan;
    geom[13] = rst_addressable(&g);
    geom[14] = (long)g.scan_start;
    geom[15] = (long)g.scan_end;
    return g.n_markers;
}

#define RST_STACK_OFFSETS 1024

/* Builds the sub-image JPEG holding scaled rows [y, y + h) and columns [x, x + w) at scale 1/denom (coordinates
 * of the scaled image), plus max_v_samp_factor rows and max_h_samp_factor columns of context on each side (fancy
 * chroma upsampling reads the neighbouring chroma sample; with that context the sub-image's pixels of the region
 * are the full decode's), rounded out to whole restart intervals: the headers with the sub-image's size in SOF,
 * the entropy-coded data of only those intervals, RST markers renumbered from 0, EOI. Row-interval streams give
 * a full-width band. The sub-image starts at scaled column *left and row *top. *sub is malloc'ed (rst_free)
 * unless it would be the whole image, in which case *sub is NULL and the caller decodes the original. Returns 0
 * (sub-image built, or whole image), 1 (the stream is not addressable: decode the original), -1 on an error in
 * the headers or the region, -2 on truncated entropy-coded data. */
static int rst_make_sub(const unsigned char *data, unsigned long size, int denom, int x, int y, int w, int h,
                        unsigned char **sub, unsigned long *sub_size, int *left, int *top, char *err, int err_len) {
    struct rst_geom g;
    unsigned long stack_offs[RST_STACK_OFFSETS], *offs = stack_offs;
    int rc;
    long cap = RST_STACK_OFFSETS, mode, k, gc, per_row, n_int, r0, r1, c0, c1, r, j, seq = 0;
    long x0, x1, y0, y1, top_px, bot_px, left_px, right_px;
    unsigned long pos, alloc;
    unsigned char *b;
    *sub = NULL;
    *sub_size = 0;
    *left = *top = 0;
    rc = rst_parse(data, size, &g, offs, cap, 1, err, err_len);
    if (rc < 0)
        return rc;
    if ((long)x + w > (g.width + denom - 1) / denom || (long)y + h > (g.height + denom - 1) / denom)
        RST_ERR("region lies outside the (scaled) image");
    mode = rst_addressable(&g);
    if (!mode)
        return 1;
    if (g.n_markers > cap) {
        cap = g.n_markers;
        offs = (unsigned long *)malloc((size_t)cap * sizeof(*offs));
        if (offs == NULL)
            RST_ERR("out of memory");
        rc = rst_parse(data, size, &g, offs, cap, 1, err, err_len);
        if (rc < 0) {
            free(offs);
            return rc;
        }
    }
    /* An interval spans k MCU rows and gc MCU columns; a row holds per_row intervals. */
    k = mode == RST_ROWS ? g.restart_interval / g.mcus_per_row : 1;
    gc = mode == RST_ROWS ? g.mcus_per_row : g.restart_interval;
    per_row = mode == RST_ROWS ? 1 : g.mcus_per_row / g.restart_interval;
    n_int = g.n_markers + 1;
    y0 = ((long)y - g.max_v) * denom;
    y1 = ((long)y + h + g.max_v) * denom;
    x0 = ((long)x - g.max_h) * denom;
    x1 = ((long)x + w + g.max_h) * denom;
    y0 = y0 < 0 ? 0 : y0;
    x0 = x0 < 0 ? 0 : x0;
    y1 = y1 > g.height ? g.height : y1;
    x1 = x1 > g.width ? g.width : x1;
    r0 = (y0 / g.mcu_h) / k * k;
    r1 = ((y1 + g.mcu_h - 1) / g.mcu_h + k - 1) / k * k;
    r1 = r1 > g.mcu_rows ? g.mcu_rows : r1;
    c0 = (x0 / g.mcu_w) / gc * gc;
    c1 = ((x1 + g.mcu_w - 1) / g.mcu_w + gc - 1) / gc * gc;
    c1 = c1 > g.mcus_per_row ? g.mcus_per_row : c1;
    /* libjpeg upsamples chroma with the fancy (triangle) filter only where a component is more than 2 samples
     * wide, else by replication: a sub-image ending in the image's last, partial MCU column must be wider than
     * that MCU, or its pixels would differ from the full decode's. */
    if (c0 > 0 && c1 == g.mcus_per_row && (long)g.width - c0 * g.mcu_w < g.mcu_w)
        c0 -= gc;
    if (r0 == 0 && r1 == g.mcu_rows && c0 == 0 && c1 == g.mcus_per_row) {
        if (offs != stack_offs)
            free(offs);
        return 0;
    }
    top_px = r0 * g.mcu_h;
    bot_px = r1 * g.mcu_h > g.height ? g.height : r1 * g.mcu_h;
    left_px = c0 * g.mcu_w;
    right_px = c1 * g.mcu_w > g.width ? g.width : c1 * g.mcu_w;
    /* The selected intervals' bytes, plus a marker between rows (each replaces one of the dropped ones). */
    alloc = size + 2 * (unsigned long)(r1 - r0) + 4;
    b = (unsigned char *)malloc(alloc);
    if (b == NULL) {
        if (offs != stack_offs)
            free(offs);
        RST_ERR("out of memory");
    }
    memcpy(b, data, g.scan_start);
    b[g.sof_pos + 1] = (unsigned char)((bot_px - top_px) >> 8);
    b[g.sof_pos + 2] = (unsigned char)((bot_px - top_px) & 0xFF);
    b[g.sof_pos + 3] = (unsigned char)((right_px - left_px) >> 8);
    b[g.sof_pos + 4] = (unsigned char)((right_px - left_px) & 0xFF);
    pos = g.scan_start;
    /* Row intervals: one contiguous run of intervals. Otherwise one run a MCU row: the intervals of [c0, c1). */
    for (r = (mode == RST_ROWS ? r0 / k : r0); r < (mode == RST_ROWS ? r0 / k + 1 : r1); r++) {
        long j0 = mode == RST_ROWS ? r0 / k : r * per_row + c0 / gc;
        long j1 = mode == RST_ROWS ? (r1 + k - 1) / k : r * per_row + c1 / gc;
        unsigned long start = j0 == 0 ? g.scan_start : offs[j0 - 1] + 2;
        unsigned long end = j1 >= n_int ? g.scan_end : offs[j1 - 1];
        if (pos != g.scan_start) {
            b[pos++] = 0xFF;
            b[pos++] = (unsigned char)(0xD0 + (seq++ & 7));
        }
        memcpy(b + pos, data + start, end - start);
        for (j = j0; j < j1 - 1; j++) /* the run's own markers, renumbered in the new stream's sequence */
            b[pos + (offs[j] - start) + 1] = (unsigned char)(0xD0 + (seq++ & 7));
        pos += end - start;
    }
    b[pos++] = 0xFF;
    b[pos++] = 0xD9;
    if (offs != stack_offs)
        free(offs);
    *sub = b;
    *sub_size = pos;
    *left = (int)(left_px / denom);
    *top = (int)(top_px / denom);
    return 0;
}

/* The sub-image JPEG of rst_make_sub into caller memory (`out`, `cap` >= size + 2 * MCU rows + 4 bytes):
 * info[0] = its size in bytes, info[1] = its first column, info[2] = its first row (scaled), info[3] = 1 when the
 * stream is not addressable or the sub-image is the whole image (then `out` holds a copy of the source).
 * Returns 0 or -1. */
int rst_band(const unsigned char *data, unsigned long size, int denom, int x, int y, int w, int h,
             unsigned char *out, unsigned long cap, long *info, char *err, int err_len) {
    unsigned char *sub;
    unsigned long sub_size;
    int left, top, rc;
    if (check_region(denom, x, y, w, h, err, err_len) < 0)
        return -1;
    rc = rst_make_sub(data, size, denom, x, y, w, h, &sub, &sub_size, &left, &top, err, err_len);
    if (rc < 0)
        return -1;
    if (sub == NULL) {
        sub = (unsigned char *)data;
        sub_size = size;
        left = top = 0;
    }
    if (sub_size > cap) {
        if (sub != data)
            free(sub);
        set_error(err, err_len, "output buffer too small for the sub-image");
        return -1;
    }
    memcpy(out, sub, sub_size);
    info[0] = (long)sub_size;
    info[1] = left;
    info[2] = top;
    info[3] = sub == data;
    if (sub != data)
        free(sub);
    return 0;
}

/* roi_decode's contract (window, win[0..3] in the whole image's scaled coordinates) by stream surgery: decodes
 * only the restart intervals of the sub-image holding the region; a stream without usable restart markers is
 * decoded whole by roi_decode. Returns 0 (sub-image decoded), 1 (whole stream decoded), or -1. */
int rst_decode(const unsigned char *data, unsigned long size, int denom, int x, int y, int w, int h, int channels,
               unsigned char *out, unsigned long cap, int *win, char *err, int err_len) {
    unsigned char *sub;
    unsigned long sub_size;
    int left, top, rc;
    if (check_region(denom, x, y, w, h, err, err_len) < 0)
        return -1;
    rc = rst_make_sub(data, size, denom, x, y, w, h, &sub, &sub_size, &left, &top, err, err_len);
    if (rc == -2)
        return -1;
    /* Headers our parser refuses (rc -1) go to libjpeg, whose recovery (or message) decode_region also gives. */
    if (sub == NULL)
        return roi_decode(data, size, denom, x, y, w, h, channels, out, cap, win, err, err_len) == 0 ? 1 : -1;
    rc = roi_decode(sub, sub_size, denom, x - left, y - top, w, h, channels, out, cap, win, err, err_len);
    free(sub);
    if (rc != 0)
        return -1;
    win[0] += left;
    win[1] += top;
    return 0;
}
