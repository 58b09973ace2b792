//! The shell lexer on arbitrary words, with both escape characters and every mode.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strata_frontend::shell::Lex;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let Ok(word) = std::str::from_utf8(rest) else {
        return;
    };
    let env: Vec<(String, String)> = vec![
        ("PWD".into(), "/home".into()),
        ("SHELL".into(), "bash".into()),
        ("KOREAN".into(), "한국어".into()),
        ("EMPTY".into(), String::new()),
        ("SPACES".into(), " a  b ".into()),
        ("GLOB".into(), "*.t?t".into()),
        ("DOLLAR".into(), "$x${y}".into()),
    ];
    let mut lex = Lex::new(if mode & 1 == 0 { '\\' } else { '`' });
    lex.raw_quotes = mode & 2 != 0;
    lex.skip_unset_env = mode & 4 != 0;
    lex.raw_escapes = mode & 8 != 0;
    lex.skip_process_quotes = mode & 16 != 0;
    let _ = lex.process_word(word, &env);
    let _ = lex.process_words(word, &env);
    let _ = lex.process_word_with_matches(word, &env);
});
