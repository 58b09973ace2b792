//! Parser + typed instructions + lowering with a resolver that knows every image.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strata_dag::image::ImageConfig;
use strata_dag::Platform;
use strata_frontend::convert::{convert, ConvertOptions, ImageResolver, ResolvedImage};

struct FakeResolver;

impl ImageResolver for FakeResolver {
    fn resolve(&self, reference: &str, _platform: &Platform) -> Result<ResolvedImage, String> {
        if reference.contains("missing") {
            return Err(format!("{reference}: not found"));
        }
        let mut config = ImageConfig::default();
        config.config.env = vec!["PATH=/bin".into(), "A=b".into()];
        config.config.on_build = vec!["RUN echo onbuild".into(), "ENV X=$A".into()];
        Ok(ResolvedImage {
            pinned: format!("example.com/{reference}@sha256:{}", "0".repeat(64)),
            config,
        })
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(parsed) = strata_frontend::parser::parse(text) {
        let _ = parsed.root.dump();
        let _ = strata_frontend::instructions::from_parse_result(&parsed);
    }
    let mut opts = ConvertOptions {
        dockerfile_name: "Dockerfile".into(),
        ..Default::default()
    };
    opts.build_args.insert("A".into(), "x y".into());
    opts.build_args
        .insert("HTTP_PROXY".into(), "http://p".into());
    let _ = convert(text, &opts, &FakeResolver);
});
