/* capi_errors ARTIFACT CORRUPT_ARTIFACT IMAGE GARBAGE_IMAGE MAX_NEW_TOKENS EXPECTED_IDS
 *
 * Checks the C API from C: every failure gives a non-zero status and a message (no crash), two
 * pipelines live in one process, and calls from two threads both give the expected tokens.
 * EXPECTED_IDS: the comma-separated token ids Pipeline.generate gives for IMAGE and PROMPT.
 * Prints one line per check; exits 0 only if all pass.
 */
#include "rlens.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PROMPT "How many blue objects are there?" /* tests/test_capi.py asks the same */

static int failures = 0;
static int64_t expected[4096];
static size_t n_expected = 0;
static int max_new = 0;

static void check(int ok, const char* what) {
    printf("%s: %s\n", ok ? "ok" : "FAIL", what);
    if (!ok) failures++;
}

/* A failed call: non-zero status `want` (or any non-zero if want < 0) and a non-empty message. */
static void check_failure(rlens_status got, int want, const char* what) {
    const char* message = rlens_last_error();
    int ok = got != RLENS_OK && (want < 0 || (int)got == want) && message && message[0];
    printf("%s: %s -> status %d, message: %s\n", ok ? "ok" : "FAIL", what, (int)got, message ? message : "(null)");
    if (!ok) failures++;
}

static int same_tokens(const rlens_result* r) {
    const int64_t* ids = NULL;
    size_t n = 0;
    if (rlens_result_token_ids(r, &ids, &n) != RLENS_OK || n != n_expected) return 0;
    return memcmp(ids, expected, n * sizeof(int64_t)) == 0;
}

static rlens_status answer(rlens_pipeline* p, const char* image, rlens_result** out) {
    rlens_params params = rlens_default_params();
    params.max_new_tokens = max_new;
    return rlens_generate(p, image, NULL, 0, PROMPT, &params, NULL, NULL, out);
}

struct text { char buf[65536]; size_t len; int calls; };

static void collect(const char* piece, void* user_data) {
    struct text* t = (struct text*)user_data;
    size_t n = strlen(piece);
    if (t->len + n < sizeof t->buf) {
        memcpy(t->buf + t->len, piece, n);
        t->len += n;
        t->buf[t->len] = 0;
    }
    t->calls++;
}

struct job { rlens_pipeline* pipeline; const char* image; int ok; char error[512]; };

static void* run_job(void* arg) {
    struct job* j = (struct job*)arg;
    for (int i = 0; i < 3; i++) {
        rlens_result* r = NULL;
        rlens_status s = answer(j->pipeline, j->image, &r);
        j->ok = s == RLENS_OK && same_tokens(r);
        if (s != RLENS_OK) snprintf(j->error, sizeof j->error, "%s", rlens_last_error());
        rlens_result_free(r);
        if (!j->ok) break;
    }
    return NULL;
}

static unsigned char* read_file(const char* path, size_t* size) {
    FILE* f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char* data = (unsigned char*)malloc((size_t)n);
    *size = fread(data, 1, (size_t)n, f);
    fclose(f);
    return data;
}

int main(int argc, char** argv) {
    if (argc != 7) {
        fprintf(stderr, "usage: %s ARTIFACT CORRUPT_ARTIFACT IMAGE GARBAGE_IMAGE MAX_NEW_TOKENS EXPECTED_IDS\n", argv[0]);
        return 2;
    }
    const char *artifact = argv[1], *corrupt = argv[2], *image = argv[3], *garbage = argv[4];
    max_new = atoi(argv[5]);
    for (char* tok = strtok(argv[6], ","); tok && n_expected < 4096; tok = strtok(NULL, ","))
        expected[n_expected++] = strtoll(tok, NULL, 10);

    rlens_pipeline* p = (rlens_pipeline*)0x1;
    rlens_result* r = (rlens_result*)0x1;

    /* opening */
    check_failure(rlens_pipeline_open("/nonexistent/rlens-artifact", "cpu", &p), RLENS_ERR_NOT_FOUND, "missing directory");
    check(p == NULL, "out is NULL after a failure");
    check_failure(rlens_pipeline_open(corrupt, "cpu", &p), RLENS_ERR_BAD_INPUT, "corrupt decoder.onnx");
    check(strstr(rlens_last_error(), "decoder.onnx") != NULL, "the message names decoder.onnx");
    check_failure(rlens_pipeline_open(NULL, "cpu", &p), RLENS_ERR_INVALID_ARGUMENT, "NULL artifact_dir");
    check_failure(rlens_pipeline_open(artifact, "cpu", NULL), RLENS_ERR_INVALID_ARGUMENT, "NULL out");
    check_failure(rlens_pipeline_open(artifact, "no-such-provider", &p), -1, "unknown provider");

    rlens_pipeline *a = NULL, *b = NULL;
    check(rlens_pipeline_open(artifact, NULL, &a) == RLENS_OK && a, "open the artifact");
    check(rlens_last_error()[0] == 0, "no message after a success");
    check(rlens_pipeline_open(artifact, "cpu", &b) == RLENS_OK && b, "open it a second time in one process");
    if (!a || !b) {
        printf("FAIL: cannot go on without pipelines: %s\n", rlens_last_error());
        return 1;
    }

    /* generating: failures */
    check_failure(answer(a, "/nonexistent/picture.png", &r), RLENS_ERR_NOT_FOUND, "missing image file");
    check(r == NULL, "result is NULL after a failure");
    check_failure(answer(a, garbage, &r), RLENS_ERR_BAD_INPUT, "unreadable image file");
    static const unsigned char junk[] = "definitely not a PNG";
    check_failure(rlens_generate(a, NULL, junk, sizeof junk, PROMPT, NULL, NULL, NULL, &r), RLENS_ERR_BAD_INPUT,
                  "unreadable image bytes");
    check_failure(rlens_generate(NULL, image, NULL, 0, PROMPT, NULL, NULL, NULL, &r), RLENS_ERR_INVALID_ARGUMENT,
                  "NULL pipeline");
    check_failure(rlens_generate(a, image, NULL, 0, NULL, NULL, NULL, NULL, &r), RLENS_ERR_INVALID_ARGUMENT,
                  "NULL prompt");
    check_failure(rlens_generate(a, image, NULL, 0, PROMPT, NULL, NULL, NULL, NULL), RLENS_ERR_INVALID_ARGUMENT,
                  "NULL out");
    check_failure(rlens_generate(a, NULL, NULL, 5, PROMPT, NULL, NULL, NULL, &r), RLENS_ERR_INVALID_ARGUMENT,
                  "NULL image_bytes with a size");
    rlens_params bad = rlens_default_params();
    bad.do_sample = 1;
    bad.temperature = 0.0f;
    check_failure(rlens_generate(a, image, NULL, 0, PROMPT, &bad, NULL, NULL, &r), RLENS_ERR_BAD_INPUT,
                  "temperature 0 with sampling");
    const int64_t* ids = NULL;
    size_t n = 0;
    check_failure(rlens_result_token_ids(NULL, &ids, &n), RLENS_ERR_INVALID_ARGUMENT, "token ids of a NULL result");
    check(rlens_result_text(NULL)[0] == 0 && rlens_result_num_visual_tokens(NULL) == -1, "accessors of NULL");
    rlens_result_free(NULL);
    rlens_pipeline_free(NULL);

    /* generating: successes */
    check(answer(a, image, &r) == RLENS_OK && same_tokens(r), "first pipeline: the expected tokens");
    check(rlens_result_num_visual_tokens(r) > 0, "visual tokens counted");
    rlens_result_free(r);
    r = NULL;
    check(answer(b, image, &r) == RLENS_OK && same_tokens(r), "second pipeline: the expected tokens");
    const char* plain_text = rlens_result_text(r);
    char text_copy[65536];
    snprintf(text_copy, sizeof text_copy, "%s", plain_text);
    rlens_result_free(r);
    r = NULL;

    struct text streamed = {{0}, 0, 0};
    rlens_params params = rlens_default_params();
    params.max_new_tokens = max_new;
    check(rlens_generate(a, image, NULL, 0, PROMPT, &params, collect, &streamed, &r) == RLENS_OK && same_tokens(r),
          "streaming: the expected tokens");
    check(streamed.calls > 0 && strcmp(streamed.buf, rlens_result_text(r)) == 0 &&
              strcmp(streamed.buf, text_copy) == 0,
          "streaming: the pieces add up to the text");
    rlens_result_free(r);
    r = NULL;

    size_t size = 0;
    unsigned char* bytes = read_file(image, &size);
    check(bytes && rlens_generate(a, NULL, bytes, size, PROMPT, &params, NULL, NULL, &r) == RLENS_OK && same_tokens(r),
          "image as bytes: the expected tokens");
    free(bytes);
    rlens_result_free(r);

    /* two threads: one per pipeline, then both on the same pipeline */
    for (int shared = 0; shared < 2; shared++) {
        struct job jobs[2] = {{a, image, 0, {0}}, {shared ? a : b, image, 0, {0}}};
        pthread_t threads[2];
        for (int i = 0; i < 2; i++) pthread_create(&threads[i], NULL, run_job, &jobs[i]);
        for (int i = 0; i < 2; i++) pthread_join(threads[i], NULL);
        for (int i = 0; i < 2; i++) {
            char what[600];
            snprintf(what, sizeof what, "thread %d (%s pipeline): the expected tokens %s", i,
                     shared ? "a shared" : "its own", jobs[i].error);
            check(jobs[i].ok, what);
        }
    }

    rlens_pipeline_free(a);
    rlens_pipeline_free(b);
    printf("%d failure(s)\n", failures);
    return failures ? 1 : 0;
}
