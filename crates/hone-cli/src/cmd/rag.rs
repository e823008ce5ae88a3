//! `hone rag index|add|remove|query`: build a retrieval index from documents, change it in
//! place, and search it (hone-rag): BM25, plus dense embeddings and hybrid ranking when the index
//! is built with `--embedder`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use hone_rag::embed::EmbedderSettings;
use hone_rag::{
    build_index, BuildOptions, ChunkConfig, FusionConfig, IndexUpdate, OpenOptions, RagIndex,
    SearchMode, SearchOptions,
};

use crate::args::{
    OnErrorArg, RagAddArgs, RagCommand, RagIndexArgs, RagQueryArgs, RagRemoveArgs, SearchModeArg,
};

pub fn run(command: RagCommand) -> Result<()> {
    match command {
        RagCommand::Index(args) => index(args),
        RagCommand::Add(args) => add(args),
        RagCommand::Remove(args) => remove(args),
        RagCommand::Query(args) => query(args),
    }
}

fn policy(arg: OnErrorArg) -> hone_data::OnError {
    match arg {
        OnErrorArg::Skip => hone_data::OnError::Skip,
        OnErrorArg::Fail => hone_data::OnError::Fail,
    }
}

fn print_skipped(skipped: &[hone_data::RecordError]) {
    for error in skipped {
        eprintln!("skipped: {error}");
    }
}

fn index(args: RagIndexArgs) -> Result<()> {
    let max_tokens = match (args.max_tokens, &args.embedder) {
        (Some(n), _) => n,
        (None, Some(dir)) => {
            let settings = EmbedderSettings::read(dir)?;
            ChunkConfig::default()
                .max_tokens
                .min(settings.max_seq_len.saturating_sub(2))
        }
        (None, None) => ChunkConfig::default().max_tokens,
    };
    let vectors = args.vector_policy();
    let options = BuildOptions {
        inputs: args.docs,
        out: args.out.clone(),
        chunking: ChunkConfig {
            max_tokens,
            overlap_tokens: args.overlap.unwrap_or_else(|| {
                let d = ChunkConfig::default();
                d.overlap_tokens * max_tokens / d.max_tokens
            }),
        },
        tokenizer: args.tokenizer,
        embedder: args.embedder,
        vectors,
        on_error: policy(args.on_error),
        force: args.force,
    };
    let report = build_index(&options)?;
    print_skipped(&report.skipped);
    println!(
        "indexed {} documents as {} chunks ({} skipped) into {} in {:.2} s \
         (read + chunk {:.2} s, embed {:.2} s, index {:.2} s)",
        report.documents,
        report.chunks,
        report.skipped.len(),
        args.out.display(),
        report.read_seconds + report.embed_seconds + report.index_seconds,
        report.read_seconds,
        report.embed_seconds,
        report.index_seconds
    );
    if let Some(dense) = hone_rag::Manifest::read(&args.out)?.dense {
        println!(
            "dense search: {} ({} chunks; --vector-search auto builds the HNSW graph from {})",
            vector_search_name(dense.search),
            report.chunks,
            dense.policy.hnsw_threshold
        );
    }
    Ok(())
}

fn vector_search_name(search: hone_rag::VectorSearch) -> &'static str {
    match search {
        hone_rag::VectorSearch::Exact => "exact",
        hone_rag::VectorSearch::Hnsw => "hnsw",
    }
}

fn summary(index: &RagIndex) -> String {
    let m = index.manifest();
    let dense = match &m.dense {
        Some(d) => format!(", dense search {}", vector_search_name(d.search)),
        None => String::new(),
    };
    format!(
        "{} now holds {} documents, {} chunks (generation {}{dense})",
        index.dir().display(),
        m.documents,
        m.chunks,
        m.generation
    )
}

fn open(dir: &std::path::Path, embedder: Option<PathBuf>) -> Result<RagIndex> {
    Ok(RagIndex::open_with(dir, &OpenOptions { embedder })?)
}

fn add(args: RagAddArgs) -> Result<()> {
    let mut index = open(&args.dir, args.embedder)?;
    let (report, skipped) = index.add_inputs(&args.docs, policy(args.on_error))?;
    print_skipped(&skipped);
    println!(
        "added {} and replaced {} documents ({} chunks, {} skipped); {}",
        report.added,
        report.replaced,
        report.chunks,
        skipped.len(),
        summary(&index)
    );
    Ok(())
}

fn remove(args: RagRemoveArgs) -> Result<()> {
    let mut index = open(&args.dir, args.embedder)?;
    let report = index.remove(&args.ids)?;
    println!(
        "removed {} documents ({} chunks); {}",
        report.documents,
        report.chunks,
        summary(&index)
    );
    Ok(())
}

fn query(args: RagQueryArgs) -> Result<()> {
    let index = open(&args.dir, args.embedder)?;
    let options = SearchOptions {
        mode: match args.mode {
            SearchModeArg::Auto => SearchMode::Auto,
            SearchModeArg::Lexical => SearchMode::Lexical,
            SearchModeArg::Dense => SearchMode::Dense,
            SearchModeArg::Hybrid => SearchMode::Hybrid,
        },
        fusion: FusionConfig {
            k: args.rrf_k,
            weights: vec![args.lexical_weight, args.dense_weight],
        },
        candidates: args.candidates,
    };
    let hits = index.search_with(&args.query, args.k as usize, &options)?;
    if hits.is_empty() {
        eprintln!("no chunk matches the query");
    }
    for (i, hit) in hits.iter().enumerate() {
        let rank = i + 1;
        if args.json {
            let mut value = serde_json::to_value(hit).context("serialising a hit")?;
            value["rank"] = rank.into();
            println!("{value}");
        } else {
            let c = &hit.chunk;
            println!(
                "{rank}. {}  score {:.3}  [{}] {} chars {}..{}",
                c.id, hit.score, c.title, c.source, c.span.start_char, c.span.end_char
            );
            println!("   {}", c.text.replace('\n', "\n   "));
        }
    }
    Ok(())
}
