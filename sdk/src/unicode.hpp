#pragma once
// Unicode for the tokenizers: UTF-8 to code points and back, the classes their pre-tokenizer regexes use,
// and lowercasing. Internal to libablate_sdk.

#include <string>
#include <string_view>

namespace ablate::sdk::unicode {

/// Code points of UTF-8 text; an invalid byte becomes U+FFFD, as Rust's from_utf8_lossy does.
std::u32string decode(std::string_view utf8);
std::string encode(std::u32string_view text);
std::string encode(char32_t c);

// As the `tokenizers` library sees characters (sdk/src/unicode_tables.inc, read off it by
// scripts/gen_unicode_tables.py): regex classes as its Oniguruma does, the rest as Rust's std does.
bool is_letter(char32_t c);      ///< \p{L}
bool is_number(char32_t c);      ///< \p{N}
bool is_whitespace(char32_t c);  ///< \s (White_Space)
bool is_word(char32_t c);        ///< \w
bool is_numeric(char32_t c);     ///< Rust's char::is_numeric, what the Digits pre-tokenizer splits on
/// Rust's char::to_lowercase, character by character (no final-sigma rule): the Lowercase normalizer.
std::u32string lowercase(std::u32string_view text);

}  // namespace ablate::sdk::unicode
