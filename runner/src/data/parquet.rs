//! Parquet files with a text column, read with polars: only the named column is decoded.
//! Documents are tokenized and joined with the tokenizer's separator; the column's text is
//! dropped once tokenized, so peak memory is one file's column plus its tokens.

use std::path::Path;

use polars::prelude::{DataType, ParquetReader, SerReader};

use super::tokenizer::Tokenizer;
use super::tokens::TokenData;

pub fn load(file: &Path, column: &str, tok: Tokenizer) -> Result<TokenData, String> {
    let shown = file.display();
    let f = std::fs::File::open(file).map_err(|e| format!("{shown}: {e}"))?;
    let df = ParquetReader::new(f)
        .with_columns(Some(vec![column.to_string()]))
        .finish()
        .map_err(|e| format!("{shown}: cannot read column `{column}` as Parquet: {e}"))?;
    let col = df
        .column(column)
        .map_err(|e| format!("{shown}: no column `{column}`: {e}"))?;
    if col.dtype() != &DataType::String {
        return Err(format!(
            "{shown}: column `{column}` holds {} values, not text; name the text column with \
             `column: \"...\"`",
            col.dtype()
        ));
    }
    let texts = col.str().map_err(|e| format!("{shown}: {e}"))?;
    let mut tokens = Vec::new();
    for doc in texts.downcast_iter().flat_map(|arr| arr.iter()).flatten() {
        if !tokens.is_empty() {
            tokens.push(tok.separator());
        }
        tokens.extend(tok.encode(doc));
    }
    if tokens.is_empty() {
        return Err(format!("{shown}: column `{column}` has no text"));
    }
    Ok(TokenData::Owned(tokens))
}

#[cfg(test)]
mod tests {
    use super::*;
    use polars::prelude::{df, ParquetWriter};

    #[test]
    fn reads_the_text_column_and_joins_documents() {
        let dir = std::env::temp_dir().join(format!("sweep-parquet-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("docs.parquet");
        let mut df = df!(
            "id" => &[1i64, 2, 3],
            "text" => &["ab", "c", "Hello world"],
        )
        .unwrap();
        ParquetWriter::new(std::fs::File::create(&file).unwrap())
            .finish(&mut df)
            .unwrap();
        let mut out = Vec::new();
        let bytes = load(&file, "text", Tokenizer::Bytes).unwrap();
        bytes.extend(0..bytes.len(), &mut out);
        assert_eq!(
            out,
            b"ab\nc\nHello world"
                .iter()
                .map(|&b| b as u32)
                .collect::<Vec<_>>()
        );
        out.clear();
        let bpe = load(&file, "text", Tokenizer::Gpt2).unwrap();
        bpe.extend(bpe.len() - 3..bpe.len(), &mut out);
        assert_eq!(out, vec![50256, 15496, 995]);
        let err = load(&file, "id", Tokenizer::Bytes).err().unwrap();
        assert!(err.contains("not text"), "{err}");
    }
}
