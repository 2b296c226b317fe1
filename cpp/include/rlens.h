/* rlens.h - the C API of the rlens runtime.
 *
 * Embeds the Python runtime (rlens.runtime.pipeline.Pipeline) in-process: librlens starts a
 * CPython interpreter on first use and drives the same code as `rlens run`, so the tokens are
 * identical. The interpreter is the one librlens was built against; its environment (where
 * `rlens`, onnxruntime, numpy, tokenizers are installed) is found from a Python executable:
 *
 *     RLENS_PYTHON=/path/to/venv/bin/python   at run time, if set;
 *     otherwise the Python_EXECUTABLE given to CMake when librlens was built.
 *
 * That Python must be the same major.minor version librlens was built against.
 *
 * Rules:
 *   - Every function returning rlens_status returns RLENS_OK (0) on success; on failure it
 *     returns a non-zero code, sets *out (if any) to NULL, and rlens_last_error() gives a
 *     one-line message. No C++ or Python exception crosses this API.
 *   - Handles are opaque; free them with their _free function (NULL is accepted).
 *   - All functions may be called from any thread. Calls into Python are serialized by the
 *     Python GIL; one pipeline runs one generation at a time (calls on the same pipeline from
 *     several threads wait for each other). ONNX Runtime releases the GIL while a graph runs,
 *     so generations on different pipelines can overlap partly.
 */
#ifndef RLENS_H
#define RLENS_H

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#  if defined(RLENS_BUILDING)
#    define RLENS_API __declspec(dllexport)
#  else
#    define RLENS_API __declspec(dllimport)
#  endif
#else
#  define RLENS_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

typedef enum rlens_status {
    RLENS_OK = 0,
    RLENS_ERR_INVALID_ARGUMENT = 1, /* a NULL pointer, an empty prompt, out-of-range params */
    RLENS_ERR_NOT_FOUND = 2,        /* the artifact directory or the image file does not exist */
    RLENS_ERR_BAD_INPUT = 3,        /* the runtime rejected the input: corrupt or incompatible
                                       artifact, unreadable image, prompt longer than the context
                                       (an rlens.errors.RlensError; the message says what to do) */
    RLENS_ERR_PYTHON = 4,           /* the embedded interpreter could not start or import rlens */
    RLENS_ERR_RUNTIME = 5           /* anything else (a bug: please report the message) */
} rlens_status;

typedef struct rlens_pipeline rlens_pipeline; /* an opened artifact directory */
typedef struct rlens_result rlens_result;     /* one generation */

/* How to generate. Start from rlens_default_params() and change fields. A negative (or, for
 * do_sample, -1) value means "the checkpoint's default from rlens.json". */
typedef struct rlens_params {
    int max_new_tokens; /* <= 0: default */
    int do_sample;      /* -1: default, 0: greedy, 1: sample */
    float temperature;  /* < 0: default; else must be > 0 */
    int top_k;          /* < 0: default; 0 disables top-k */
    float top_p;        /* < 0: default; else in (0, 1] */
    int64_t seed;       /* < 0: no fixed seed */
} rlens_params;

/* Called with each piece of the answer's text (UTF-8, NUL-terminated, valid only during the
 * call) as it is generated, on the thread that called rlens_generate. It must not call
 * rlens_generate on the same pipeline. */
typedef void (*rlens_piece_callback)(const char* piece, void* user_data);

RLENS_API rlens_params rlens_default_params(void);

/* Open an artifact directory written by `rlens export`. provider: "cpu", "cuda" or "tensorrt";
 * NULL means "cpu". */
RLENS_API rlens_status rlens_pipeline_open(const char* artifact_dir, const char* provider,
                                           rlens_pipeline** out);
RLENS_API void rlens_pipeline_free(rlens_pipeline* pipeline);

/* Answer `prompt` about one image: a file path (image_path non-NULL), or the encoded bytes of an
 * image file (image_path NULL, image_bytes/image_size), or no image (both NULL / 0).
 * params may be NULL (all defaults). on_piece may be NULL; with it the text is streamed as it is
 * generated. The result always holds the full text and token ids. */
RLENS_API rlens_status rlens_generate(rlens_pipeline* pipeline, const char* image_path,
                                      const unsigned char* image_bytes, size_t image_size,
                                      const char* prompt, const rlens_params* params,
                                      rlens_piece_callback on_piece, void* user_data,
                                      rlens_result** out);

/* Accessors; the pointers they give live as long as the result. */
RLENS_API const char* rlens_result_text(const rlens_result* result); /* "" for NULL */
RLENS_API rlens_status rlens_result_token_ids(const rlens_result* result, const int64_t** ids,
                                              size_t* n);
RLENS_API rlens_status rlens_result_prompt_ids(const rlens_result* result, const int64_t** ids,
                                               size_t* n);
RLENS_API int rlens_result_num_visual_tokens(const rlens_result* result); /* -1 for NULL */
RLENS_API double rlens_result_ttft_ms(const rlens_result* result);
RLENS_API double rlens_result_decode_tokens_per_s(const rlens_result* result);
RLENS_API const char* rlens_result_finish_reason(const rlens_result* result); /* "eos"/"length" */
RLENS_API void rlens_result_free(rlens_result* result);

/* The message of the last failure on this thread ("" if none); valid until the next call into
 * rlens on this thread. */
RLENS_API const char* rlens_last_error(void);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* RLENS_H */
