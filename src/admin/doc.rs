//! In-place edits of the config file that keep comments and layout (toml_edit).
//!
//! Every save validates the edited text with [`Config::parse`] first, so an admin command can
//! never write a config that `serve` would refuse, and writes atomically (temp file in the same
//! directory, fsync, rename), so a running proxy reloading on the change never sees half a
//! file. This module never talks to AWS.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use toml_edit::{Array, DocumentMut, InlineTable, Item, Table, value};

use crate::auth::KeyHash;
use crate::config::Config;

/// A config file open for editing.
pub struct ConfigDoc {
    path: PathBuf,
    doc: DocumentMut,
}

impl ConfigDoc {
    pub fn open(path: &Path) -> anyhow::Result<ConfigDoc> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let doc: DocumentMut = text
            .parse()
            .with_context(|| format!("{} is not valid TOML", path.display()))?;
        Ok(ConfigDoc {
            path: path.to_path_buf(),
            doc,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The current text, as it would be saved.
    pub fn text(&self) -> String {
        self.doc.to_string()
    }

    /// Validates the edited document (with the prices file it names) and replaces the file
    /// atomically.
    pub fn save(&self) -> anyhow::Result<Config> {
        let text = self.text();
        let config = Config::parse_at(&text, &self.path)
            .map_err(|e| anyhow::anyhow!("the edit would make the config invalid: {e}"))?;
        write_atomic(&self.path, text.as_bytes())?;
        Ok(config)
    }

    /// Sets the top-level `prices_file`.
    pub fn set_prices_file(&mut self, name: &str) -> anyhow::Result<()> {
        self.doc.as_table_mut().insert("prices_file", value(name));
        Ok(())
    }

    fn users_mut(&mut self) -> anyhow::Result<&mut Table> {
        let root = self.doc.as_table_mut();
        if !root.contains_key("users") {
            let mut t = Table::new();
            // `[users.alice]` headers only, no bare `[users]`.
            t.set_implicit(true);
            root.insert("users", Item::Table(t));
        }
        root.get_mut("users")
            .and_then(Item::as_table_mut)
            .context("`users` in the config is not a table")
    }

    fn user_mut(&mut self, name: &str) -> anyhow::Result<&mut Table> {
        self.users_mut()?
            .get_mut(name)
            .and_then(Item::as_table_mut)
            .with_context(|| format!("no user `{name}` in the config"))
    }

    pub fn has_user(&self, name: &str) -> bool {
        self.doc.get("users").and_then(|u| u.get(name)).is_some()
    }

    /// Adds `[users.NAME]` with no keys, optional tags and models mapped to `"auto"`.
    pub fn add_user(
        &mut self,
        name: &str,
        tags: &[(String, String)],
        models: &[String],
    ) -> anyhow::Result<()> {
        if self.has_user(name) {
            bail!("user `{name}` already exists");
        }
        let mut user = Table::new();
        user.insert("keys", value(Array::new()));
        if !tags.is_empty() {
            let mut t = InlineTable::new();
            for (k, v) in tags {
                t.insert(k, v.as_str().into());
            }
            user.insert("tags", value(t));
        }
        if !models.is_empty() {
            let mut m = Table::new();
            for model in models {
                m.insert(model, value(crate::config::AUTO));
            }
            user.insert("models", Item::Table(m));
        }
        self.users_mut()?.insert(name, Item::Table(user));
        Ok(())
    }

    pub fn remove_user(&mut self, name: &str) -> anyhow::Result<()> {
        self.users_mut()?
            .remove(name)
            .map(|_| ())
            .with_context(|| format!("no user `{name}` in the config"))
    }

    /// Appends a key hash to the user's `keys`.
    pub fn add_key(&mut self, name: &str, hash: &KeyHash) -> anyhow::Result<()> {
        let user = self.user_mut(name)?;
        if !user.contains_key("keys") {
            user.insert("keys", value(Array::new()));
        }
        let keys = user
            .get_mut("keys")
            .and_then(Item::as_array_mut)
            .with_context(|| format!("users.{name}.keys is not an array"))?;
        keys.push(hash.to_string());
        Ok(())
    }

    /// Adds an issued SigV4 access key id to `users.NAME.access_key_ids`.
    pub fn add_access_key_id(&mut self, name: &str, id: &str) -> anyhow::Result<()> {
        let user = self.user_mut(name)?;
        if !user.contains_key("access_key_ids") {
            user.insert("access_key_ids", value(Array::new()));
        }
        user.get_mut("access_key_ids")
            .and_then(Item::as_array_mut)
            .with_context(|| format!("users.{name}.access_key_ids is not an array"))?
            .push(id);
        Ok(())
    }

    /// Removes one access key id, or all with `None`; returns how many were removed.
    pub fn revoke_access_key_ids(&mut self, name: &str, id: Option<&str>) -> anyhow::Result<usize> {
        let user = self.user_mut(name)?;
        let Some(ids) = user.get_mut("access_key_ids").and_then(Item::as_array_mut) else {
            return Ok(0);
        };
        let before = ids.len();
        match id {
            None => ids.clear(),
            Some(id) => ids.retain(|v| v.as_str() != Some(id)),
        }
        Ok(before - ids.len())
    }

    /// `auth.sigv4_master_key_file` as written, if set.
    pub fn master_key_file(&self) -> Option<String> {
        self.doc
            .get("auth")
            .and_then(|a| a.get("sigv4_master_key_file"))
            .and_then(Item::as_str)
            .map(str::to_string)
    }

    /// Sets `auth.sigv4_master_key_file`.
    pub fn set_master_key_file(&mut self, name: &str) -> anyhow::Result<()> {
        let root = self.doc.as_table_mut();
        if !root.contains_key("auth") {
            root.insert("auth", Item::Table(Table::new()));
        }
        root.get_mut("auth")
            .and_then(Item::as_table_mut)
            .context("`auth` in the config is not a table")?
            .insert("sigv4_master_key_file", value(name));
        Ok(())
    }

    /// Removes one key hash, or all with `None`; returns how many were removed.
    pub fn revoke_keys(&mut self, name: &str, hash: Option<&KeyHash>) -> anyhow::Result<usize> {
        let user = self.user_mut(name)?;
        let Some(keys) = user.get_mut("keys").and_then(Item::as_array_mut) else {
            return Ok(0);
        };
        let before = keys.len();
        match hash {
            None => keys.clear(),
            Some(h) => {
                let wanted = h.to_string();
                keys.retain(|v| v.as_str().map(|s| s.to_ascii_lowercase()) != Some(wanted.clone()));
            }
        }
        Ok(before - keys.len())
    }

    /// Sets `users.USER.models."MODEL"` to an ARN, keeping the entry's position and comments.
    /// Sets `users.NAME.emails` (the signed-in identities that are this user).
    pub fn set_emails(&mut self, name: &str, emails: &[&str]) -> anyhow::Result<()> {
        let mut list = Array::new();
        for e in emails {
            list.push(*e);
        }
        self.user_mut(name)?.insert("emails", value(list));
        Ok(())
    }

    /// Sets `users.NAME.limits` to these (absent ones stay unset).
    pub fn set_limits(
        &mut self,
        name: &str,
        limits: &crate::config::UserLimits,
    ) -> anyhow::Result<()> {
        let mut t = InlineTable::new();
        if let Some(b) = limits.monthly_budget_usd {
            t.insert("monthly_budget_usd", b.into());
        }
        let int = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        if let Some(r) = limits.requests_per_minute {
            t.insert("requests_per_minute", int(r).into());
        }
        if let Some(r) = limits.tokens_per_minute {
            t.insert("tokens_per_minute", int(r).into());
        }
        if !t.is_empty() {
            self.user_mut(name)?.insert("limits", value(t));
        }
        Ok(())
    }

    pub fn set_model(&mut self, user: &str, model: &str, arn: &str) -> anyhow::Result<()> {
        let u = self.user_mut(user)?;
        if !u.contains_key("models") {
            u.insert("models", Item::Table(Table::new()));
        }
        let models = u
            .get_mut("models")
            .and_then(Item::as_table_like_mut)
            .with_context(|| format!("users.{user}.models is not a table"))?;
        match models.get_mut(model).and_then(Item::as_value_mut) {
            Some(v) => {
                let decor = v.decor().clone();
                *v = arn.into();
                *v.decor_mut() = decor;
            }
            None => {
                models.insert(model, value(arn));
            }
        }
        Ok(())
    }
}

/// Replaces `path` with `bytes` so readers see the old file or the new one, never a mix, and
/// the new one survives a crash once this returns. Keeps the old file's permissions.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = crate::config::dir_of(path);
    let name = path
        .file_name()
        .context("config path has no file name")?
        .to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| -> anyhow::Result<()> {
        let mut f = std::fs::File::create(&tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        f.write_all(bytes)?;
        if let Ok(meta) = std::fs::metadata(path) {
            f.set_permissions(meta.permissions())?;
        }
        f.sync_all()?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("cannot replace {}", path.display()))?;
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    const START: &str = r#"# bedrock-gate config — top comment
listen = "127.0.0.1:8787"   # trailing comment

[aws]
region = "us-east-1"

# Alice is on the ML team.
[users.alice]
keys = []  # none yet
[users.alice.models]
# sonnet for alice
"anthropic.claude-sonnet-4-5-20250929-v1:0" = "auto"   # provisioned by apply
"#;

    fn doc(text: &str) -> (tempfile::TempDir, ConfigDoc) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, text).unwrap();
        let d = ConfigDoc::open(&p).unwrap();
        (dir, d)
    }

    #[test]
    fn edits_keep_comments_and_unrelated_formatting_byte_for_byte() {
        let (_dir, mut d) = doc(START);
        let h = KeyHash::of_key("k1");
        d.add_key("alice", &h).unwrap();
        d.set_model(
            "alice",
            "anthropic.claude-sonnet-4-5-20250929-v1:0",
            "arn:aws:bedrock:us-east-1:123456789012:application-inference-profile/abc",
        )
        .unwrap();
        d.add_user(
            "bob",
            &[("team".into(), "web".into())],
            &["anthropic.claude-haiku-4-5-20251001-v1:0".into()],
        )
        .unwrap();
        d.save().unwrap();
        let text = std::fs::read_to_string(d.path()).unwrap();
        let expected_head = format!(
            r#"# bedrock-gate config — top comment
listen = "127.0.0.1:8787"   # trailing comment

[aws]
region = "us-east-1"

# Alice is on the ML team.
[users.alice]
keys = ["{h}"]  # none yet
[users.alice.models]
# sonnet for alice
"anthropic.claude-sonnet-4-5-20250929-v1:0" = "arn:aws:bedrock:us-east-1:123456789012:application-inference-profile/abc"   # provisioned by apply
"#
        );
        assert!(text.starts_with(&expected_head), "got:\n{text}");
        assert!(
            text.contains("[users.bob]\nkeys = []\ntags = { team = \"web\" }\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "[users.bob.models]\n\"anthropic.claude-haiku-4-5-20251001-v1:0\" = \"auto\"\n"
            ),
            "{text}"
        );
        assert!(!text.contains("[users]\n"), "{text}");
    }

    #[test]
    fn revoke_one_or_all() {
        let (_dir, mut d) = doc(START);
        let (a, b) = (KeyHash::of_key("a"), KeyHash::of_key("b"));
        d.add_key("alice", &a).unwrap();
        d.add_key("alice", &b).unwrap();
        assert_eq!(d.revoke_keys("alice", Some(&a)).unwrap(), 1);
        assert_eq!(d.revoke_keys("alice", Some(&a)).unwrap(), 0);
        assert!(d.text().contains(&b.to_string()));
        assert_eq!(d.revoke_keys("alice", None).unwrap(), 1);
        assert!(d.revoke_keys("nobody", None).is_err());
    }

    #[test]
    fn users_are_added_to_an_empty_file_and_removed() {
        let (_dir, mut d) = doc("");
        d.add_user("carol", &[], &[]).unwrap();
        assert!(d.add_user("carol", &[], &[]).is_err());
        d.save().unwrap();
        assert_eq!(
            std::fs::read_to_string(d.path()).unwrap(),
            "[users.carol]\nkeys = []\n"
        );
        d.remove_user("carol").unwrap();
        assert!(d.remove_user("carol").is_err());
    }

    #[test]
    fn an_edit_that_breaks_validation_is_not_written() {
        let (_dir, mut d) = doc(START);
        d.add_user("bad name", &[], &[]).unwrap();
        let err = d.save().unwrap_err().to_string();
        assert!(err.contains("users.bad name"), "{err}");
        assert_eq!(std::fs::read_to_string(d.path()).unwrap(), START);
    }
}
