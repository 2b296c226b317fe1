// rlens_example ARTIFACT_DIR IMAGE PROMPT [MAX_NEW_TOKENS]
//
// Answers PROMPT about IMAGE with an artifact directory written by `rlens export`, streaming the
// text as it is generated, then prints the answer's token ids and its number of visual tokens.
#include "rlens.hpp"

#include <cstdlib>
#include <iostream>
#include <string>

int main(int argc, char** argv) {
    if (argc < 4 || argc > 5) {
        std::cerr << "usage: " << argv[0] << " ARTIFACT_DIR IMAGE PROMPT [MAX_NEW_TOKENS]\n";
        return 2;
    }
    rlens::Params params;
    if (argc == 5) params.max_new_tokens(std::atoi(argv[4]));
    try {
        rlens::Pipeline pipeline(argv[1]);
        rlens::Result answer = pipeline.generate(argv[2], argv[3], params, [](std::string_view piece) {
            std::cout << piece << std::flush;
        });
        std::cout << "\ntokens:";
        for (int64_t id : answer.token_ids()) std::cout << ' ' << id;
        std::cout << "\nvisual_tokens: " << answer.num_visual_tokens() << '\n';
        std::cerr << "ttft " << answer.ttft_ms() << " ms, " << answer.decode_tokens_per_s() << " tokens/s, "
                  << answer.finish_reason() << '\n';
    } catch (const rlens::Error& e) {
        std::cerr << "error: " << e.what() << '\n';
        return 1;
    }
    return 0;
}
