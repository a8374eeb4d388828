//! The demo's mail store: one Dovecot per pool of `config/mailgate.yaml`, on the ports that
//! config names, holding the users of `config/accounts.yaml` that route to that pool, each
//! INBOX seeded with a message that says which pool it lives in. Runs until SIGINT/SIGTERM,
//! then stops everything it started. `scripts/demo` runs it next to mailgate.
//!
//! It reuses the test harness (`tests/common`), so the demo's backends are configured exactly
//! like the ones the end-to-end tests prove.

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::{Dovecot, DovecotOpts, Postfix, PostfixOpts};
use mailgate::accounts::AccountStore;
use mailgate::config::{Config, LoginConfig};
use mailgate::routing::Router;

fn main() -> anyhow::Result<()> {
    let config_path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "config/mailgate.yaml".to_string());
    let config = Config::load(Path::new(&config_path)).map_err(|errors| {
        anyhow::anyhow!(errors
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("\n"))
    })?;
    let store = AccountStore::load(&config.accounts.path).map_err(|errors| {
        anyhow::anyhow!(errors
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("\n"))
    })?;
    let router = Router::from_config(&config)?;

    // Users by the pool their address routes to.
    let mut users: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for address in store.addresses() {
        if let Some(route) = router.route(address) {
            users
                .entry(route.pool.name.clone())
                .or_default()
                .push(address.to_string());
        }
    }

    let mut backends = Vec::new();
    let mut lmtp_routes = Vec::new();
    for (name, pool) in &config.pools {
        let LoginConfig::Master { user, .. } = &pool.login else {
            anyhow::bail!("pools.{name}: the demo backends need `login: {{ mode: master }}`");
        };
        let password = config
            .master_password(name)
            .map_err(|e| anyhow::anyhow!("pools.{name}: {e}"))?;
        for address in &pool.imap {
            let port: u16 = address
                .rsplit_once(':')
                .and_then(|(_, p)| p.parse().ok())
                .ok_or_else(|| anyhow::anyhow!("pools.{name}.imap: {address} has no port"))?;
            let mut opts = DovecotOpts::default()
                .master(user, password.expose())
                .with_lmtp();
            opts.imap_port = Some(port);
            let pool_users = users.get(name).cloned().unwrap_or_default();
            for u in &pool_users {
                // Nobody logs in to the demo Dovecot directly: mailgate uses the master user.
                opts = opts.user(u, &format!("direct-{}", rand_token()));
            }
            let dovecot = Dovecot::start(opts);
            for u in &pool_users {
                let message = format!(
                    "From: postmaster@skydesk.jp\r\nTo: {u}\r\nSubject: Welcome to mailgate (pool {name})\r\n\r\n\
                     Hello {u},\r\n\r\nthis mailbox lives in Dovecot {address}, the backend of pool `{name}`.\r\n\
                     You reached it through mailgate.\r\n"
                );
                dovecot.deliver(u, "INBOX", message.as_bytes());
                // Folders for the folder-visibility rule to show (grace sees INBOX, Sent and
                // Work; Private stays hidden from her IMAP clients).
                for folder in ["Sent", "Work", "Private"] {
                    let note = format!(
                        "From: postmaster@skydesk.jp\r\nTo: {u}\r\nSubject: In {folder}\r\n\r\nA message in {folder}.\r\n"
                    );
                    dovecot.deliver(u, folder, note.as_bytes());
                }
            }
            println!(
                "demo backend: pool {name}: Dovecot on {} with {} users (mail under {})",
                dovecot.imap_addr(),
                pool_users.len(),
                dovecot.dir().display()
            );
            for u in &pool_users {
                if let Some((_, domain)) = u.rsplit_once('@') {
                    lmtp_routes.push((domain.to_string(), dovecot.lmtp_addr()));
                }
            }
            backends.push(dovecot);
        }
    }

    // One Postfix per SMTP backend port named in the config (the shipped config has one,
    // shared by both pools), taking XCLIENT from mailgate and delivering each domain over
    // LMTP to the Dovecot of the pool it routes to.
    let mut smtp_ports: Vec<u16> = config
        .pools
        .values()
        .flat_map(|p| p.smtp.iter())
        .filter_map(|a| a.rsplit_once(':').and_then(|(_, p)| p.parse().ok()))
        .collect();
    smtp_ports.sort_unstable();
    smtp_ports.dedup();
    let mut postfixes = Vec::new();
    for port in smtp_ports {
        let mut opts = PostfixOpts::default().myhostname("smtp-backend.skydesk.jp");
        opts.domains.clear();
        opts.port = Some(port);
        lmtp_routes.sort();
        lmtp_routes.dedup();
        for (domain, lmtp) in &lmtp_routes {
            opts = opts.route(domain, *lmtp);
        }
        let postfix = Postfix::start(opts);
        println!(
            "demo backend: Postfix submission on {} (log {}/postfix.log)",
            postfix.submission_addr(),
            postfix.dir().display()
        );
        postfixes.push(postfix);
    }
    println!("demo backends ready");

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        anyhow::Ok(())
    })?;
    println!("stopping the demo backends");
    drop(postfixes);
    drop(backends);
    Ok(())
}

fn rand_token() -> String {
    format!("{:016x}", rand::random::<u64>())
}
