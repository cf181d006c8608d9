// ftfy's text fixes, CLIP's whitespace clean-up and Python's lower-casing on code points, with the
// Unicode character database of ICU.
#include "src/tokenizers/text_cleaning.h"

#include <algorithm>
#include <array>
#include <cstdint>
#include <optional>
#include <unordered_map>

#include <unicode/normalizer2.h>
#include <unicode/uchar.h>
#include <unicode/unistr.h>
#include <unicode/locid.h>

#include "src/core/error.h"

namespace sdt {

std::u32string utf8_decode(std::string_view utf8, const std::string& where) {
  std::u32string out;
  out.reserve(utf8.size());
  size_t i = 0;
  while (i < utf8.size()) {
    const auto lead = static_cast<unsigned char>(utf8[i]);
    int length = 0;
    char32_t c = 0;
    char32_t smallest = 0;  // below this the sequence is an overlong encoding
    if (lead < 0x80) {
      length = 1, c = lead;
    } else if ((lead & 0xE0) == 0xC0) {
      length = 2, c = lead & 0x1F, smallest = 0x80;
    } else if ((lead & 0xF0) == 0xE0) {
      length = 3, c = lead & 0x0F, smallest = 0x800;
    } else if ((lead & 0xF8) == 0xF0) {
      length = 4, c = lead & 0x07, smallest = 0x10000;
    } else {
      fail(where, "text is not valid UTF-8: byte 0x{:02X} at offset {} cannot start a character", lead, i);
    }
    if (i + length > utf8.size()) fail(where, "text is not valid UTF-8: it ends inside a character at offset {}", i);
    for (int k = 1; k < length; ++k) {
      const auto next = static_cast<unsigned char>(utf8[i + k]);
      if ((next & 0xC0) != 0x80) fail(where, "text is not valid UTF-8: truncated character at offset {}", i);
      c = (c << 6) | (next & 0x3F);
    }
    if (c < smallest || c > 0x10FFFF || (c >= 0xD800 && c <= 0xDFFF)) {
      fail(where, "text is not valid UTF-8: overlong, surrogate or out-of-range character at offset {}", i);
    }
    out.push_back(c);
    i += length;
  }
  return out;
}

std::string utf8_encode(std::u32string_view text) {
  std::string out;
  out.reserve(text.size());
  for (char32_t c : text) {
    if (c < 0x80) {
      out.push_back(static_cast<char>(c));
    } else if (c < 0x800) {
      out.push_back(static_cast<char>(0xC0 | (c >> 6)));
      out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
    } else if (c < 0x10000) {
      out.push_back(static_cast<char>(0xE0 | (c >> 12)));
      out.push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
      out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
    } else {
      out.push_back(static_cast<char>(0xF0 | (c >> 18)));
      out.push_back(static_cast<char>(0x80 | ((c >> 12) & 0x3F)));
      out.push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
      out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
    }
  }
  return out;
}

bool is_letter(char32_t c) { return (U_GET_GC_MASK(c) & U_GC_L_MASK) != 0; }
bool is_number(char32_t c) { return (U_GET_GC_MASK(c) & U_GC_N_MASK) != 0; }
// The `regex` package's \s is the White_Space property (Python's str.isspace() adds U+1C..U+1F,
// which fix_text has removed by the time CLIP strips the text).
bool is_white_space(char32_t c) { return u_isUWhiteSpace(static_cast<UChar32>(c)); }

int decimal_digit_value(char32_t c) {
  if (u_charType(static_cast<UChar32>(c)) != U_DECIMAL_DIGIT_NUMBER) return -1;
  return u_charDigitValue(static_cast<UChar32>(c));
}

namespace {

icu::UnicodeString to_icu(std::u32string_view text) {
  return icu::UnicodeString::fromUTF32(reinterpret_cast<const UChar32*>(text.data()),
                                       static_cast<int32_t>(text.size()));
}

std::u32string from_icu(const icu::UnicodeString& text) {
  std::u32string out;
  out.reserve(static_cast<size_t>(text.length()));
  for (int32_t i = 0; i < text.length(); i = text.moveIndex32(i, 1)) {
    out.push_back(static_cast<char32_t>(text.char32At(i)));
  }
  return out;
}

const icu::Normalizer2& normalizer(bool compatibility) {
  UErrorCode status = U_ZERO_ERROR;
  const icu::Normalizer2* instance = compatibility ? icu::Normalizer2::getNFKCInstance(status)
                                                   : icu::Normalizer2::getNFCInstance(status);
  if (U_FAILURE(status)) fail("ICU", "cannot load the Unicode normalization data: {}", u_errorName(status));
  return *instance;
}

std::u32string normalize(std::u32string_view text, bool compatibility) {
  UErrorCode status = U_ZERO_ERROR;
  icu::UnicodeString normalized = normalizer(compatibility).normalize(to_icu(text), status);
  if (U_FAILURE(status)) fail("ICU", "Unicode normalization failed: {}", u_errorName(status));
  return from_icu(normalized);
}

// Windows-1252's characters for bytes 0x80-0x9F; the five bytes it leaves undefined stay
// themselves, as in ftfy's "sloppy" codec and in HTML's numeric references.
constexpr std::array<char32_t, 32> kWindows1252High = {
    0x20AC, 0x0081, 0x201A, 0x0192, 0x201E, 0x2026, 0x2020, 0x2021, 0x02C6, 0x2030, 0x0160,
    0x2039, 0x0152, 0x008D, 0x017D, 0x008F, 0x0090, 0x2018, 0x2019, 0x201C, 0x201D, 0x2022,
    0x2013, 0x2014, 0x02DC, 0x2122, 0x0161, 0x203A, 0x0153, 0x009D, 0x017E, 0x0178};

struct HtmlEntity {
  std::string_view name;
  std::u32string_view text;
};

constexpr HtmlEntity kHtmlEntities[] = {
#include "src/tokenizers/html_entities.inc"
};

bool is_ascii_alnum(char32_t c) {
  return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
}

bool is_ascii_letter(char32_t c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }

// What Python's html.unescape makes of a numeric reference "#123" / "#x7B" (the body between
// '&' and ';'), or nothing when html.unescape would leave a ';' in its result, in which case ftfy
// keeps the reference as written.
std::optional<std::u32string> numeric_reference(std::u32string_view body) {
  const bool hex = body.size() > 1 && (body[1] == 'x' || body[1] == 'X');
  const std::u32string_view digits = body.substr(hex ? 2 : 1);
  if (digits.empty()) return std::nullopt;
  uint64_t value = 0;
  for (char32_t c : digits) {
    int digit = -1;
    if (c >= '0' && c <= '9') digit = static_cast<int>(c - '0');
    else if (hex && c >= 'a' && c <= 'f') digit = static_cast<int>(c - 'a' + 10);
    else if (hex && c >= 'A' && c <= 'F') digit = static_cast<int>(c - 'A' + 10);
    if (digit < 0) return std::nullopt;  // html.unescape stops here and the ';' survives
    value = std::min<uint64_t>(value * (hex ? 16 : 10) + static_cast<uint64_t>(digit), 0x110000);
  }
  // HTML5's rules for invalid references, as Python implements them.
  if (value == 0) return U"\uFFFD";
  if (value == 0x0D) return U"\r";
  if (value >= 0x80 && value <= 0x9F) return std::u32string(1, kWindows1252High[value - 0x80]);
  if ((value >= 0xD800 && value <= 0xDFFF) || value > 0x10FFFF) return U"\uFFFD";
  const bool noncharacter = (value >= 0xFDD0 && value <= 0xFDEF) || (value & 0xFFFE) == 0xFFFE;
  if ((value >= 0x01 && value <= 0x08) || value == 0x0B || (value >= 0x0E && value <= 0x1F) ||
      value == 0x7F || noncharacter) {
    return U"";
  }
  if (value == ';') return std::nullopt;
  return std::u32string(1, static_cast<char32_t>(value));
}

// ftfy's unescape_html: "&name;" for the names in its table and "&#...;" numeric references,
// where the name part is 1 to 24 ASCII letters or digits.
std::u32string unescape_html(std::u32string_view text) {
  std::u32string out;
  size_t i = 0;
  while (i < text.size()) {
    if (text[i] == '&') {
      const size_t body_start = i + 1;
      const size_t name_start = body_start < text.size() && text[body_start] == '#' ? body_start + 1 : body_start;
      size_t name_end = name_start;
      while (name_end < text.size() && is_ascii_alnum(text[name_end])) ++name_end;
      const size_t name_length = name_end - name_start;
      if (name_length >= 1 && name_length <= 24 && name_end < text.size() && text[name_end] == ';') {
        const std::u32string_view body = text.substr(body_start, name_end - body_start);
        std::optional<std::u32string> replacement;
        if (body[0] == '#') {
          replacement = numeric_reference(body);
        } else {
          const std::string name = utf8_encode(body);
          const auto* entity = std::lower_bound(std::begin(kHtmlEntities), std::end(kHtmlEntities), name,
                                                [](const HtmlEntity& e, const std::string& n) { return e.name < n; });
          if (entity != std::end(kHtmlEntities) && entity->name == name) replacement = std::u32string(entity->text);
        }
        if (replacement) {
          out += *replacement;
        } else {
          out += text.substr(i, name_end + 1 - i);
        }
        i = name_end + 1;
        continue;
      }
    }
    out.push_back(text[i++]);
  }
  return out;
}

// ftfy's fix_latin_ligatures: the Latin ligatures (not those of other scripts) become letters.
std::u32string_view latin_ligature(char32_t c) {
  switch (c) {
    case 0x0132: return U"IJ";
    case 0x0133: return U"ij";
    case 0x0149: return U"\u02BCn";
    case 0x01F1: return U"DZ";
    case 0x01F2: return U"Dz";
    case 0x01F3: return U"dz";
    case 0x01C4: return U"D\u017D";
    case 0x01C5: return U"D\u017E";
    case 0x01C6: return U"d\u017E";
    case 0x01C7: return U"LJ";
    case 0x01C8: return U"Lj";
    case 0x01C9: return U"lj";
    case 0x01CA: return U"NJ";
    case 0x01CB: return U"Nj";
    case 0x01CC: return U"nj";
    case 0xFB00: return U"ff";
    case 0xFB01: return U"fi";
    case 0xFB02: return U"fl";
    case 0xFB03: return U"ffi";
    case 0xFB04: return U"ffl";
    case 0xFB05: return U"\u017Ft";
    case 0xFB06: return U"st";
    default: return {};
  }
}

// ftfy's fix_character_width: the ideographic space becomes a space, and each character of the
// Halfwidth and Fullwidth Forms block (U+FF01-U+FFEF) its compatibility (NFKC) form.
const std::unordered_map<char32_t, std::u32string>& width_map() {
  static const std::unordered_map<char32_t, std::u32string> map = [] {
    std::unordered_map<char32_t, std::u32string> m{{0x3000, U" "}};
    for (char32_t c = 0xFF01; c < 0xFFF0; ++c) {
      std::u32string standard = normalize(std::u32string(1, c), true);
      if (standard != std::u32string(1, c)) m.emplace(c, std::move(standard));
    }
    return m;
  }();
  return map;
}

// ftfy's remove_control_chars: C0 controls other than tab, line feed, form feed and carriage
// return, DEL, the deprecated Arabic format controls, the byte order mark, and the interlinear
// annotation and object replacement characters.
bool is_unwanted_control(char32_t c) {
  return c <= 0x08 || c == 0x0B || (c >= 0x0E && c <= 0x1F) || c == 0x7F || (c >= 0x206A && c <= 0x206F) ||
         c == 0xFEFF || (c >= 0xFFF9 && c <= 0xFFFC);
}

char32_t uncurl_quote(char32_t c) {
  if (c == 0x02BC || (c >= 0x2018 && c <= 0x201B)) return '\'';
  if (c >= 0x201C && c <= 0x201F) return '"';
  return c;
}

// One pass of ftfy's character-for-characters fixes, each applied to what the one before it
// produced, in ftfy's order: C1 controls, Latin ligatures, character width, curly quotes.
std::u32string fix_characters(std::u32string_view text) {
  const auto& widths = width_map();
  std::u32string out;
  out.reserve(text.size());
  for (char32_t c : text) {
    if (c >= 0x80 && c <= 0x9F) c = kWindows1252High[c - 0x80];
    const std::u32string_view ligature = latin_ligature(c);
    for (char32_t letter : ligature.empty() ? std::u32string_view(&c, 1) : ligature) {
      const auto wide = widths.find(letter);
      for (char32_t standard : wide == widths.end() ? std::u32string_view(&letter, 1) : wide->second) {
        out.push_back(uncurl_quote(standard));
      }
    }
  }
  return out;
}

// ftfy's fix_line_breaks: CRLF, CR, LINE SEPARATOR, PARAGRAPH SEPARATOR and NEXT LINE become "\n".
std::u32string fix_line_breaks(std::u32string_view text) {
  std::u32string out;
  out.reserve(text.size());
  for (size_t i = 0; i < text.size(); ++i) {
    const char32_t c = text[i];
    if (c == '\r') {
      out.push_back('\n');
      if (i + 1 < text.size() && text[i + 1] == '\n') ++i;
    } else if (c == 0x2028 || c == 0x2029 || c == 0x85) {
      out.push_back('\n');
    } else {
      out.push_back(c);
    }
  }
  return out;
}

// ftfy's remove_terminal_escapes: ESC '[' (decimal digits of any script | ';')* ASCII-letter.
std::u32string remove_terminal_escapes(std::u32string_view text) {
  std::u32string out;
  out.reserve(text.size());
  size_t i = 0;
  while (i < text.size()) {
    if (text[i] == 0x1B && i + 1 < text.size() && text[i + 1] == '[') {
      size_t end = i + 2;
      while (end < text.size() && (text[end] == ';' || decimal_digit_value(text[end]) >= 0)) ++end;
      if (end < text.size() && is_ascii_letter(text[end])) {
        i = end + 1;
        continue;
      }
    }
    out.push_back(text[i++]);
  }
  return out;
}

// ftfy's fix_and_explain on one line of text, repeated until nothing changes.
std::u32string fix_segment(std::u32string text, bool unescape) {
  while (true) {
    const std::u32string before = text;
    if (unescape) text = unescape_html(text);
    text = fix_characters(text);
    text = fix_line_breaks(text);
    text = remove_terminal_escapes(text);
    std::erase_if(text, is_unwanted_control);
    text = normalize(text, false);
    if (text == before) return text;
  }
}

}  // namespace

std::u32string fix_text(std::u32string_view text) {
  // ftfy works line by line (at most 1,000,000 characters at a time), and from the first line that
  // holds a '<' on it stops decoding HTML entities: the text is probably HTML then.
  constexpr size_t kMaxSegment = 1'000'000;
  std::u32string out;
  bool unescape = true;
  size_t pos = 0;
  while (pos < text.size()) {
    const size_t newline = text.find(U'\n', pos);
    size_t end = newline == std::u32string_view::npos ? text.size() : newline + 1;
    end = std::min(end, pos + kMaxSegment);
    const std::u32string_view segment = text.substr(pos, end - pos);
    if (segment.find(U'<') != std::u32string_view::npos) unescape = false;
    out += fix_segment(std::u32string(segment), unescape);
    pos = end;
  }
  return out;
}

std::u32string whitespace_clean(std::u32string_view text) {
  std::u32string out;
  out.reserve(text.size());
  for (char32_t c : text) {
    if (!is_white_space(c)) out.push_back(c);
    else if (out.empty() || out.back() != ' ') out.push_back(' ');
  }
  // Python's str.strip() also strips U+1C..U+1F, which the `regex` package's \s leaves alone.
  const auto is_python_space = [](char32_t c) { return is_white_space(c) || (c >= 0x1C && c <= 0x1F); };
  const auto first = std::find_if_not(out.begin(), out.end(), is_python_space);
  const auto last = std::find_if_not(out.rbegin(), out.rend(), is_python_space).base();
  return first < last ? std::u32string(first, last) : std::u32string();
}

std::u32string to_lower(std::u32string_view text) {
  icu::UnicodeString lowered = to_icu(text);
  lowered.toLower(icu::Locale::getRoot());
  return from_icu(lowered);
}

}  // namespace sdt
