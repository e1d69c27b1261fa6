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
#include <string.h>

#include <jpeglib.h>

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
    if (!(denom == 1 || denom == 2 || denom == 4 || denom == 8)) {
        set_error(err, err_len, "scale denominator must be 1, 2, 4 or 8");
        return -1;
    }
    if (channels != 3 && channels != 4) {
        set_error(err, err_len, "channels must be 3 (RGB) or 4 (RGBX)");
        return -1;
    }
    if (x < 0 || y < 0 || w <= 0 || h <= 0) {
        set_error(err, err_len, "region must have x, y >= 0 and w, h > 0");
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
