// rlens.hpp - header-only C++ wrapper over rlens.h: RAII handles, exceptions on the C++ side only.
//
//     rlens::Pipeline pipeline("artifact_dir");
//     rlens::Result answer = pipeline.generate("cat.png", "What is this?", {}, [](std::string_view piece) {
//         std::cout << piece << std::flush;
//     });
//     answer.token_ids();  // std::vector<int64_t>
#ifndef RLENS_HPP
#define RLENS_HPP

#include "rlens.h"

#include <cstdint>
#include <exception>
#include <functional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace rlens {

// A failed call: the C status and the message of rlens_last_error().
class Error : public std::runtime_error {
public:
    Error(rlens_status status, const std::string& message) : std::runtime_error(message), status_(status) {}
    rlens_status status() const noexcept { return status_; }

private:
    rlens_status status_;
};

inline void check(rlens_status status) {
    if (status != RLENS_OK) throw Error(status, rlens_last_error());
}

// How to generate; unset fields keep the checkpoint's defaults (see rlens_params).
struct Params {
    rlens_params c = rlens_default_params();
    Params& max_new_tokens(int n) { c.max_new_tokens = n; return *this; }
    Params& greedy() { c.do_sample = 0; return *this; }
    Params& sample(float temperature, int top_k = -1, float top_p = -1.0f, int64_t seed = -1) {
        c.do_sample = 1; c.temperature = temperature; c.top_k = top_k; c.top_p = top_p; c.seed = seed;
        return *this;
    }
};

class Result {
public:
    explicit Result(rlens_result* r) noexcept : r_(r) {}
    Result(Result&& o) noexcept : r_(std::exchange(o.r_, nullptr)) {}
    Result& operator=(Result&& o) noexcept { std::swap(r_, o.r_); return *this; }
    Result(const Result&) = delete;
    Result& operator=(const Result&) = delete;
    ~Result() { rlens_result_free(r_); }

    std::string text() const { return rlens_result_text(r_); }
    std::string finish_reason() const { return rlens_result_finish_reason(r_); }
    std::vector<int64_t> token_ids() const { return ids(rlens_result_token_ids); }
    std::vector<int64_t> prompt_ids() const { return ids(rlens_result_prompt_ids); }
    int num_visual_tokens() const { return rlens_result_num_visual_tokens(r_); }
    double ttft_ms() const { return rlens_result_ttft_ms(r_); }
    double decode_tokens_per_s() const { return rlens_result_decode_tokens_per_s(r_); }
    const rlens_result* get() const noexcept { return r_; }

private:
    using Getter = rlens_status (*)(const rlens_result*, const int64_t**, size_t*);
    std::vector<int64_t> ids(Getter get) const {
        const int64_t* p = nullptr;
        size_t n = 0;
        check(get(r_, &p, &n));
        return std::vector<int64_t>(p, p + n);
    }
    rlens_result* r_;
};

using PieceCallback = std::function<void(std::string_view)>;

class Pipeline {
public:
    explicit Pipeline(const std::string& artifact_dir, const std::string& provider = "cpu") {
        check(rlens_pipeline_open(artifact_dir.c_str(), provider.c_str(), &p_));
    }
    Pipeline(Pipeline&& o) noexcept : p_(std::exchange(o.p_, nullptr)) {}
    Pipeline& operator=(Pipeline&& o) noexcept { std::swap(p_, o.p_); return *this; }
    Pipeline(const Pipeline&) = delete;
    Pipeline& operator=(const Pipeline&) = delete;
    ~Pipeline() { rlens_pipeline_free(p_); }

    // Answer about an image file ("" for no image); on_piece, if given, gets the text as it comes.
    Result generate(const std::string& image_path, const std::string& prompt, const Params& params = {},
                    PieceCallback on_piece = {}) {
        return run(image_path.empty() ? nullptr : image_path.c_str(), nullptr, 0, prompt, params, on_piece);
    }

    // Answer about an image given as the bytes of an encoded file (PNG, JPEG, ...).
    Result generate_from_bytes(const std::vector<unsigned char>& image, const std::string& prompt,
                               const Params& params = {}, PieceCallback on_piece = {}) {
        return run(nullptr, image.data(), image.size(), prompt, params, on_piece);
    }

    rlens_pipeline* get() const noexcept { return p_; }

private:
    struct Stream {
        PieceCallback* callback;
        std::exception_ptr error;
    };
    static void trampoline(const char* piece, void* user_data) {
        auto* s = static_cast<Stream*>(user_data);
        if (s->error) return;  // a callback threw: drop the rest, rethrow after the call
        try {
            (*s->callback)(piece);
        } catch (...) {
            s->error = std::current_exception();  // never let it unwind through C
        }
    }
    Result run(const char* path, const unsigned char* bytes, size_t size, const std::string& prompt,
               const Params& params, PieceCallback& on_piece) {
        Stream stream{&on_piece, nullptr};
        rlens_result* r = nullptr;
        rlens_status status = rlens_generate(p_, path, bytes, size, prompt.c_str(), &params.c,
                                             on_piece ? &Pipeline::trampoline : nullptr, &stream, &r);
        Result result(r);
        if (stream.error) std::rethrow_exception(stream.error);
        check(status);
        return result;
    }
    rlens_pipeline* p_ = nullptr;
};

}  // namespace rlens

#endif  // RLENS_HPP
