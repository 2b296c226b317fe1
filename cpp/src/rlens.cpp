// librlens: the C API of rlens.h over the Python runtime, hosted in-process with pybind11.
//
// One interpreter per process, started on the first call (std::call_once) and never finalized
// (ONNX Runtime and numpy do not survive Py_Finalize well). After start-up the GIL is released;
// every entry point takes it with py::gil_scoped_acquire. If the host process already runs Python
// (librlens loaded from Python), that interpreter is used as is.

#define RLENS_BUILDING 1
#include "rlens.h"

#include <pybind11/embed.h>
#include <pybind11/stl.h>

#include <cstdlib>
#include <exception>
#include <filesystem>
#include <mutex>
#include <new>
#include <string>
#include <vector>

namespace py = pybind11;

#ifndef RLENS_DEFAULT_PYTHON
#define RLENS_DEFAULT_PYTHON ""
#endif

struct rlens_pipeline {
    py::object pipeline;  // rlens.runtime.pipeline.Pipeline; touched only with the GIL held
    std::mutex busy;      // one generation at a time per pipeline
};

struct rlens_result {
    std::string text;
    std::string finish_reason;
    std::vector<int64_t> token_ids;
    std::vector<int64_t> prompt_ids;
    int num_visual_tokens = 0;
    double ttft_ms = 0.0;
    double decode_tokens_per_s = 0.0;
};

namespace {

thread_local std::string last_error;

struct Runtime {
    rlens_status status = RLENS_OK;
    std::string error;
    py::object* pipeline_class = nullptr;  // leaked on purpose: the interpreter is never finalized
    py::object* rlens_error = nullptr;
};

std::string python_executable() {
    if (const char* env = std::getenv("RLENS_PYTHON"); env && *env) return env;
    return RLENS_DEFAULT_PYTHON;
}

void start_interpreter() {
    PyConfig config;
    PyConfig_InitPythonConfig(&config);
    config.install_signal_handlers = 0;  // leave SIGINT & co. to the host application
    config.parse_argv = 0;
    std::string exe = python_executable();
    PyStatus st = PyStatus_Ok();
    if (!exe.empty()) {
        // getpath finds the venv (pyvenv.cfg next to the executable) and its site-packages
        st = PyConfig_SetBytesString(&config, &config.executable, exe.c_str());
        if (!PyStatus_Exception(st)) st = PyConfig_SetBytesString(&config, &config.program_name, exe.c_str());
    }
    if (PyStatus_Exception(st)) {
        PyConfig_Clear(&config);
        throw std::runtime_error("cannot configure the Python interpreter");
    }
    // pybind11 takes over the config (and clears it); errors come back as std::runtime_error
    py::initialize_interpreter(&config, 0, nullptr, false);
}

Runtime& runtime() {
    static Runtime rt;
    static std::once_flag once;
    std::call_once(once, [] {
        bool started_here = false;
        try {
            if (!Py_IsInitialized()) {
                start_interpreter();
                started_here = true;
            }
        } catch (const std::exception& e) {
            rt.status = RLENS_ERR_PYTHON;
            rt.error = std::string("cannot start the embedded Python: ") + e.what();
            return;
        }
        {
            py::gil_scoped_acquire gil;
            try {
                rt.pipeline_class = new py::object(py::module_::import("rlens.runtime.pipeline").attr("Pipeline"));
                rt.rlens_error = new py::object(py::module_::import("rlens.errors").attr("RlensError"));
            } catch (const std::exception& e) {
                rt.status = RLENS_ERR_PYTHON;
                std::string exe = python_executable();
                rt.error = std::string("cannot import rlens in the embedded Python (") +
                           (exe.empty() ? "default environment" : exe) +
                           "; set RLENS_PYTHON to the python of an environment with rlens installed): " +
                           e.what();
            }
        }
        if (started_here) PyEval_SaveThread();  // release the GIL for good; calls re-take it
    });
    return rt;
}

rlens_status fail(rlens_status status, std::string message) {
    last_error = std::move(message);
    return status;
}

std::string one_line(std::string s) {
    for (char& c : s)
        if (c == '\n' || c == '\r') c = ' ';
    return s;
}

// The current Python error, with the GIL held: a status and a one-line message.
rlens_status fail_python(py::error_already_set& e) {
    Runtime& rt = runtime();
    rlens_status status = RLENS_ERR_RUNTIME;
    std::string message;
    try {
        py::object value = e.value();
        message = py::str(value).cast<std::string>();
        if (rt.rlens_error && e.matches(*rt.rlens_error)) {
            status = RLENS_ERR_BAD_INPUT;
        } else {
            if (e.matches(PyExc_FileNotFoundError)) status = RLENS_ERR_NOT_FOUND;
            message = py::str(e.type().attr("__name__")).cast<std::string>() + ": " + message;
        }
    } catch (...) {
        message = "a Python error that cannot be printed";
    }
    return fail(status, one_line(message));
}

// Runs body() with the GIL held and turns every exception into a status and a message.
template <class F>
rlens_status guarded(F&& body) {
    last_error.clear();
    Runtime& rt = runtime();
    if (rt.status != RLENS_OK) return fail(rt.status, rt.error);
    try {
        py::gil_scoped_acquire gil;
        try {
            return body();
        } catch (py::error_already_set& e) {
            return fail_python(e);
        } catch (const py::builtin_exception& e) {  // a failed cast and the like
            return fail(RLENS_ERR_RUNTIME, one_line(e.what()));
        }
    } catch (const std::bad_alloc&) {
        return fail(RLENS_ERR_RUNTIME, "out of memory");
    } catch (const std::exception& e) {
        return fail(RLENS_ERR_RUNTIME, one_line(e.what()));
    } catch (...) {
        return fail(RLENS_ERR_RUNTIME, "unknown C++ exception");
    }
}

}  // namespace

extern "C" {

rlens_params rlens_default_params(void) {
    rlens_params p;
    p.max_new_tokens = 0;
    p.do_sample = -1;
    p.temperature = -1.0f;
    p.top_k = -1;
    p.top_p = -1.0f;
    p.seed = -1;
    return p;
}

const char* rlens_last_error(void) { return last_error.c_str(); }

rlens_status rlens_pipeline_open(const char* artifact_dir, const char* provider, rlens_pipeline** out) {
    last_error.clear();
    if (!out) return fail(RLENS_ERR_INVALID_ARGUMENT, "rlens_pipeline_open: out is NULL");
    *out = nullptr;
    if (!artifact_dir || !*artifact_dir)
        return fail(RLENS_ERR_INVALID_ARGUMENT, "rlens_pipeline_open: artifact_dir is NULL or empty");
    std::error_code ec;
    if (!std::filesystem::is_directory(artifact_dir, ec))
        return fail(RLENS_ERR_NOT_FOUND,
                    std::string("artifact directory '") + artifact_dir +
                        (std::filesystem::exists(artifact_dir, ec) ? "' is not a directory" : "' does not exist") +
                        "; give the output directory of `rlens export`");
    std::string prov = provider && *provider ? provider : "cpu";
    return guarded([&] {
        Runtime& rt = runtime();
        py::object pipeline = rt.pipeline_class->attr("load")(py::str(artifact_dir), py::str(prov));
        auto* handle = new rlens_pipeline;
        handle->pipeline = std::move(pipeline);
        *out = handle;
        return RLENS_OK;
    });
}

void rlens_pipeline_free(rlens_pipeline* pipeline) {
    if (!pipeline) return;
    if (runtime().status != RLENS_OK || !Py_IsInitialized()) {
        pipeline->pipeline.release();  // no interpreter to hand it back to
        delete pipeline;
        return;
    }
    try {
        py::gil_scoped_acquire gil;
        delete pipeline;  // drops the Python reference with the GIL held
    } catch (...) {
    }
}

rlens_status rlens_generate(rlens_pipeline* pipeline, const char* image_path, const unsigned char* image_bytes,
                            size_t image_size, const char* prompt, const rlens_params* params,
                            rlens_piece_callback on_piece, void* user_data, rlens_result** out) {
    last_error.clear();
    if (!out) return fail(RLENS_ERR_INVALID_ARGUMENT, "rlens_generate: out is NULL");
    *out = nullptr;
    if (!pipeline) return fail(RLENS_ERR_INVALID_ARGUMENT, "rlens_generate: pipeline is NULL");
    if (!prompt) return fail(RLENS_ERR_INVALID_ARGUMENT, "rlens_generate: prompt is NULL");
    if (image_size > 0 && !image_bytes)
        return fail(RLENS_ERR_INVALID_ARGUMENT, "rlens_generate: image_bytes is NULL but image_size is not 0");
    if (image_path) {
        std::error_code ec;
        if (!std::filesystem::is_regular_file(image_path, ec))
            return fail(RLENS_ERR_NOT_FOUND, std::string("image '") + image_path + "' does not exist");
    }
    rlens_params p = params ? *params : rlens_default_params();
    std::lock_guard<std::mutex> lock(pipeline->busy);  // taken before the GIL, never while holding it
    return guarded([&] {
        Runtime& rt = runtime();
        py::object image = py::none();
        if (image_path)
            image = py::str(image_path);
        else if (image_bytes && image_size)
            image = py::bytes(reinterpret_cast<const char*>(image_bytes), image_size);
        py::dict options;
        if (p.do_sample >= 0) options["do_sample"] = py::bool_(p.do_sample != 0);
        if (p.temperature >= 0) options["temperature"] = py::float_(p.temperature);
        if (p.top_k >= 0) options["top_k"] = py::int_(p.top_k);
        if (p.top_p >= 0) options["top_p"] = py::float_(p.top_p);
        if (p.seed >= 0) options["seed"] = py::int_(p.seed);
        py::object max_new = p.max_new_tokens > 0 ? py::object(py::int_(p.max_new_tokens)) : py::none();
        py::object generation;
        if (on_piece) {
            py::cpp_function emit([on_piece, user_data](const std::string& piece) {
                on_piece(piece.c_str(), user_data);
            });
            options["on_text"] = emit;  // Pipeline.generate streams the answer's text through it
            generation = pipeline->pipeline.attr("generate")(image, py::str(prompt), max_new, **options);
        } else {
            generation = pipeline->pipeline.attr("generate")(image, py::str(prompt), max_new, **options);
        }
        auto* result = new rlens_result;
        try {
            result->text = generation.attr("text").cast<std::string>();
            result->finish_reason = generation.attr("finish_reason").cast<std::string>();
            result->token_ids = generation.attr("token_ids").cast<std::vector<int64_t>>();
            result->prompt_ids = generation.attr("prompt_ids").cast<std::vector<int64_t>>();
            result->num_visual_tokens = generation.attr("num_visual_tokens").cast<int>();
            result->ttft_ms = generation.attr("ttft_ms").cast<double>();
            result->decode_tokens_per_s = generation.attr("decode_tokens_per_s").cast<double>();
        } catch (...) {
            delete result;
            throw;
        }
        *out = result;
        return RLENS_OK;
    });
}

const char* rlens_result_text(const rlens_result* result) { return result ? result->text.c_str() : ""; }

const char* rlens_result_finish_reason(const rlens_result* result) {
    return result ? result->finish_reason.c_str() : "";
}

static rlens_status ids_of(const rlens_result* result, const std::vector<int64_t>* v, const int64_t** ids,
                          size_t* n, const char* what) {
    last_error.clear();
    if (!result || !ids || !n) {
        if (ids) *ids = nullptr;
        if (n) *n = 0;
        return fail(RLENS_ERR_INVALID_ARGUMENT, std::string(what) + ": result, ids or n is NULL");
    }
    *ids = v->data();
    *n = v->size();
    return RLENS_OK;
}

rlens_status rlens_result_token_ids(const rlens_result* result, const int64_t** ids, size_t* n) {
    return ids_of(result, result ? &result->token_ids : nullptr, ids, n, "rlens_result_token_ids");
}

rlens_status rlens_result_prompt_ids(const rlens_result* result, const int64_t** ids, size_t* n) {
    return ids_of(result, result ? &result->prompt_ids : nullptr, ids, n, "rlens_result_prompt_ids");
}

int rlens_result_num_visual_tokens(const rlens_result* result) { return result ? result->num_visual_tokens : -1; }
double rlens_result_ttft_ms(const rlens_result* result) { return result ? result->ttft_ms : 0.0; }
double rlens_result_decode_tokens_per_s(const rlens_result* result) {
    return result ? result->decode_tokens_per_s : 0.0;
}

void rlens_result_free(rlens_result* result) { delete result; }

}  // extern "C"
