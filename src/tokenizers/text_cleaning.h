// Unicode text handling for the CLIP tokenizer: UTF-8 <-> code points, the character classes of
// CLIP's splitting pattern, and the cleaning Hugging Face's CLIPTokenizer applies before splitting
// when ftfy is installed (as in kohya-ss/sd-scripts' requirements): ftfy.fix_text, whitespace_clean,
// then Python's str.lower(). Character properties, case mapping and normalization come from ICU.
#pragma once

#include <string>
#include <string_view>

namespace sdt {

// Code points of a UTF-8 string; invalid UTF-8 is an error (`where` names the text's origin).
std::u32string utf8_decode(std::string_view utf8, const std::string& where);
std::string utf8_encode(std::u32string_view text);

// The classes of CLIP's pattern (\p{L}, \p{N}, \s as the `regex` package defines them) and of
// Python's `\d` (a decimal digit of any script).
bool is_letter(char32_t c);
bool is_number(char32_t c);
bool is_white_space(char32_t c);
// The value 0-9 of a decimal digit of any script, or -1.
int decimal_digit_value(char32_t c);

// ftfy.fix_text with its default configuration, except its mojibake repair (fix_encoding), which
// decodes text that looks like UTF-8 misread in another encoding: HTML entities (unless the text
// holds a '<'), C1 controls read as Windows-1252, Latin ligatures, full- and half-width forms,
// curly quotes, line breaks, terminal escapes, control characters, NFC; repeated until stable.
std::u32string fix_text(std::u32string_view text);

// CLIP's whitespace_clean: every run of white space becomes one space, then both ends are stripped.
std::u32string whitespace_clean(std::u32string_view text);

// Python's str.lower(): full lower-case mappings, with the final-sigma rule.
std::u32string to_lower(std::u32string_view text);

}  // namespace sdt
