//! The IMAP-aware relay end to end (DESIGN rules 5 and 6): a real Dovecot behind the real
//! `mailgate` binary, Python `imaplib` in front, and a second, direct connection to Dovecot to
//! see what really happened there.

mod common;

use std::time::Duration;

use common::mailgate::{Mailgate, MailgateOpts, Pool};
use common::{run_mbsync, run_python_args, Dovecot, DovecotOpts};

const MASTER: (&str, &str) = ("proxy", "master-secret");
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

/// grace: three folders (and a Cyrillic one) visible, deletes expunge at once. henry: two
/// folders, deletes only mark. ivy: a folder below a hidden one. dave: no rules, spliced.
const USERS: [(&str, &str); 4] = [
    ("grace@example.com", "grace-pass"),
    ("henry@example.com", "henry-pass"),
    ("ivy@example.com", "ivy-pass"),
    ("dave@example.com", "dave-pass"),
];

/// Python prelude: `mg(user)` logs in through mailgate (TLS, the development certificate),
/// `direct(user)` straight at Dovecot (plaintext, the user's own password).
const PRELUDE: &str = r#"
import imaplib, ssl, sys, re, hashlib, os, base64
imaplib.Commands.setdefault("MOVE", ("SELECTED",))
imaplib.Commands.setdefault("COMPRESS", ("AUTH", "SELECTED"))
CTX = ssl.create_default_context()
CTX.check_hostname = False
CTX.verify_mode = ssl.CERT_NONE
MG, DOVECOT = int(sys.argv[1]), int(sys.argv[2])
PASSWORDS = {"grace@example.com": "grace-pass", "henry@example.com": "henry-pass", "ivy@example.com": "ivy-pass", "dave@example.com": "dave-pass"}

def mg(user):
    m = imaplib.IMAP4_SSL("127.0.0.1", MG, ssl_context=CTX, timeout=20)
    m.login(user, PASSWORDS[user])
    return m

def direct(user):
    m = imaplib.IMAP4("127.0.0.1", DOVECOT, timeout=20)
    m.login(user, PASSWORDS[user])
    return m

def names(m):
    typ, data = m.list('""', '"*"')
    out = []
    for line in data:
        if isinstance(line, tuple):
            out.append(line[1].decode())
        else:
            out.append(line.decode().rsplit(" ", 1)[1].strip('"'))
    return sorted(out)

def first(data):
    value = data[0]
    return value.decode() if isinstance(value, bytes) else str(value)

def result(call):
    try:
        typ, data = call()
        return typ + " " + first(data)
    except imaplib.IMAP4.error as e:
        return "NO " + first(e.args)
"#;

struct Setup {
    dovecot: Dovecot,
    mailgate: Mailgate,
    _accounts: tempfile::TempDir,
}

impl Setup {
    fn start() -> Setup {
        let mut opts = DovecotOpts::default().master(MASTER.0, MASTER.1);
        for (user, password) in USERS {
            opts = opts.user(user, password);
        }
        let dovecot = Dovecot::start(opts);
        let accounts = tempfile::Builder::new()
            .prefix("mgtest-aware-")
            .tempdir()
            .unwrap_or_else(|e| panic!("temp dir: {e}"));
        let hash = |p: &str| mailgate::accounts::hash_password(p.as_bytes());
        let yaml = format!(
            r#"organisations:
  example.com: {{ imap: allowed, smtp: allowed }}
users:
  grace@example.com:
    password: "{}"
    imap: enabled
    imap_folders: [INBOX, Sent, Work, "Пример"]
    imap_delete: expunge_immediately
  henry@example.com:
    password: "{}"
    imap: enabled
    imap_folders: [INBOX, Work]
    imap_delete: mark_only
  ivy@example.com:
    password: "{}"
    imap: enabled
    imap_folders: [INBOX, Work.Projects]
  dave@example.com:
    password: "{}"
    imap: enabled
"#,
            hash("grace-pass"),
            hash("henry-pass"),
            hash("ivy-pass"),
            hash("dave-pass")
        );
        let path = accounts.path().join("accounts.yaml");
        std::fs::write(&path, yaml).unwrap_or_else(|e| panic!("accounts: {e}"));
        let pool = Pool::master(&[dovecot.imap_addr()], &[], MASTER.0, MASTER.1);
        let mut opts = MailgateOpts::new(pool.clone(), pool);
        opts.accounts = path;
        let mailgate = Mailgate::start(&opts);
        Setup {
            dovecot,
            mailgate,
            _accounts: accounts,
        }
    }

    fn python(&self, body: &str) -> String {
        let script = format!("{PRELUDE}\n{body}");
        let mg = self.mailgate.port("imaps").to_string();
        let dovecot = self.dovecot.imap_addr().port().to_string();
        let out = run_python_args(&script, &[&mg, &dovecot], CLIENT_TIMEOUT);
        assert!(
            out.success(),
            "{out}\n--- mailgate ---\n{}",
            self.mailgate.log()
        );
        out.stdout
    }
}

fn line<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(key).and_then(|l| l.strip_prefix(": ")))
        .unwrap_or_else(|| panic!("no `{key}` in:\n{out}"))
}

#[test]
fn hidden_folders_are_not_listed_and_cannot_be_touched() {
    let setup = Setup::start();
    let out = setup.python(
        r#"
MSG = b"From: a@example.com\r\nSubject: private\r\n\r\nsecret\r\n"
d = direct("grace@example.com")
for name in ["Sent", "Work", "Work.Projects", "Private", "Private.Sub", "Archive", "&BB8EQAQ4BDwENQRA-", "Sentinel"]:
    d.create(name)
d.append("Private", None, None, MSG)
d.append("INBOX", None, None, MSG)
d.logout()

m = mg("grace@example.com")
print("list:", " ".join(names(m)))
typ, data = m.lsub('""', '"*"')
print("select hidden:", result(lambda: m.select("Private")))
print("examine hidden:", result(lambda: m.select("Private.Sub", readonly=True)))
print("status hidden:", result(lambda: m.status("Private", "(MESSAGES)")))
print("append hidden:", result(lambda: m.append("Archive", None, None, MSG)))
print("create hidden:", result(lambda: m.create("Archive.New")))
print("delete hidden:", result(lambda: m.delete("Private.Sub")))
print("rename to hidden:", result(lambda: m.rename("Work.Projects", "Private.Stolen")))
m.literal = b"Private"
print("select literal hidden:", result(lambda: m._simple_command("SELECT")))
print("status visible:", result(lambda: m.status("Work.Projects", "(MESSAGES)")))
print("select utf7:", result(lambda: m.select("&BB8EQAQ4BDwENQRA-")))
m.literal = b"Work.Projects"
print("select literal visible:", result(lambda: m._simple_command("SELECT")))
print("select inbox:", result(lambda: m.select("inbox")))
print("copy hidden:", result(lambda: m.copy("1", "Private")))
print("uid move hidden:", result(lambda: m.uid("MOVE", "1:*", "Private")))
print("copy visible:", result(lambda: m.copy("1", "Work.Projects")))
print("create visible:", result(lambda: m.create("Work.New")))
print("catenate:", result(lambda: m._simple_command("APPEND", "Work", "CATENATE", '(URL "/Private/;UID=1")')))
print("compress:", result(lambda: m._simple_command("COMPRESS", "DEFLATE")))
print("caps again:", first(m.capability()[1]))
m.logout()

d = direct("grace@example.com")
print("direct caps:", first(d.capability()[1]))
print("direct list:", " ".join(names(d)))
print("direct private:", first(d.status("Private", "(MESSAGES)")[1]))
print("direct archive:", first(d.status("Archive", "(MESSAGES)")[1]))
print("direct projects:", first(d.status("Work.Projects", "(MESSAGES)")[1]))
d.logout()

d = direct("dave@example.com")
d.create("Private")
d.logout()
m = mg("dave@example.com")
print("dave list:", " ".join(names(m)))
print("dave select:", result(lambda: m.select("Private")))
m.logout()
"#,
    );
    assert_eq!(
        line(&out, "list"),
        "&BB8EQAQ4BDwENQRA- INBOX Sent Work Work.Projects",
        "{out}"
    );
    for key in [
        "select hidden",
        "examine hidden",
        "status hidden",
        "append hidden",
        "delete hidden",
        "select literal hidden",
        "copy hidden",
        "uid move hidden",
    ] {
        assert_eq!(
            line(&out, key),
            "NO [NONEXISTENT] No such folder",
            "{key}:\n{out}"
        );
    }
    for key in ["create hidden", "rename to hidden"] {
        assert_eq!(
            line(&out, key),
            "NO [CANNOT] This folder name is not available to IMAP clients",
            "{key}:\n{out}"
        );
    }
    for key in [
        "status visible",
        "select utf7",
        "select literal visible",
        "select inbox",
        "copy visible",
        "create visible",
    ] {
        assert!(line(&out, key).starts_with("OK"), "{key}:\n{out}");
    }
    assert_eq!(
        line(&out, "catenate"),
        "NO [CANNOT] IMAP URLs are not available on this connection"
    );
    assert_eq!(
        line(&out, "compress"),
        "NO [CANNOT] COMPRESS is not available on this connection"
    );
    // Asked again after login, the capabilities leave out what the filter refuses; Dovecot
    // itself offers it.
    let has = |key: &str, cap: &str| line(&out, key).split(' ').any(|c| c == cap);
    assert!(has("direct caps", "CATENATE"), "{out}");
    assert!(!has("caps again", "CATENATE"), "{out}");
    assert!(has("caps again", "IMAP4rev1"), "{out}");
    // Dovecot's own view: nothing happened to the hidden folders, the visible copy landed.
    let direct = line(&out, "direct list");
    for name in [
        "Private",
        "Private.Sub",
        "Archive",
        "Work.Projects",
        "Work.New",
    ] {
        assert!(direct.split(' ').any(|n| n == name), "{name}: {out}");
    }
    assert!(!direct.contains("Archive.New") && !direct.contains("Private.Stolen"));
    assert!(
        line(&out, "direct private").ends_with(" (MESSAGES 1)"),
        "{out}"
    );
    assert!(
        line(&out, "direct archive").ends_with(" (MESSAGES 0)"),
        "{out}"
    );
    assert!(
        line(&out, "direct projects").ends_with(" (MESSAGES 1)"),
        "{out}"
    );
    // A user without rules is spliced: everything shows, nothing is refused.
    assert_eq!(line(&out, "dave list"), "INBOX Private");
    assert!(line(&out, "dave select").starts_with("OK"), "{out}");
}

#[test]
fn a_hidden_parent_of_a_visible_folder_is_shown_as_noselect() {
    let setup = Setup::start();
    let out = setup.python(
        r#"
d = direct("ivy@example.com")
for name in ["Work", "Work.Projects", "Work.Secret", "Private"]:
    d.create(name)
d.subscribe("Work")
d.logout()

def listing(m, pattern):
    typ, data = m.list('""', pattern)
    return " | ".join(line.decode() for line in data if line)

m = mg("ivy@example.com")
print("top:", listing(m, "%"))
print("below work:", listing(m, "Work.%"))
print("all:", listing(m, "*"))
typ, data = m.lsub('""', "*")
print("lsub:", " | ".join(line.decode() for line in data if line))
print("select parent:", result(lambda: m.select("Work")))
print("select child:", result(lambda: m.select("Work.Projects")))
m.logout()
"#,
    );
    // Level by level, the client reaches Work.Projects through a Work it cannot open;
    // Work.Secret and Private stay hidden.
    let entries = |key: &str| {
        let mut entries: Vec<&str> = line(&out, key).split(" | ").collect();
        entries.sort_unstable();
        entries
    };
    let parent = r#"(\Noselect \HasChildren) "." Work"#;
    let child = r#"(\HasNoChildren) "." Work.Projects"#;
    let inbox = r#"(\HasNoChildren) "." INBOX"#;
    assert_eq!(entries("top"), [inbox, parent], "{out}");
    assert_eq!(entries("below work"), [child], "{out}");
    assert_eq!(entries("all"), [inbox, child, parent], "{out}");
    // Dovecot's LSUB shows a subscribed folder with no attributes; mailgate adds its own.
    assert_eq!(entries("lsub"), [parent], "{out}");
    assert_eq!(
        line(&out, "select parent"),
        "NO [NONEXISTENT] No such folder",
        "{out}"
    );
    assert!(line(&out, "select child").starts_with("OK"), "{out}");
}

/// mbsync, which walks every folder (`Patterns *`), through the aware relay: it syncs INBOX
/// and the visible folder below the hidden parent, and nothing of the hidden ones.
#[test]
fn mbsync_syncs_only_visible_folders_below_a_hidden_parent() {
    let setup = Setup::start();
    setup.python(
        r#"
d = direct("ivy@example.com")
for name in ["Work", "Work.Projects", "Work.Secret", "Private"]:
    d.create(name)
for name in ["INBOX", "Work", "Work.Projects", "Work.Secret", "Private"]:
    d.append(name, None, None, ("From: a@example.com\r\nSubject: in %s\r\n\r\nbody\r\n" % name).encode())
d.logout()
"#,
    );
    let dir = setup.mailgate.dir().join("mbsync-ivy");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let config = format!(
        "IMAPAccount acct\nHost localhost\nPort {port}\nUser ivy@example.com\nPass ivy-pass\n\
         SSLType IMAPS\nCertificateFile {cert}\n\nIMAPStore remote\nAccount acct\n\n\
         MaildirStore local\nPath {d}/\nInbox {d}/INBOX\nSubFolders Verbatim\n\n\
         Channel sync\nFar :remote:\nNear :local:\nPatterns *\nCreate Near\nSync Pull\n\
         SyncState *\n",
        port = setup.mailgate.port("imaps"),
        cert = setup.mailgate.cert_path().display(),
        d = dir.display()
    );
    let out = run_mbsync(&dir, &config, CLIENT_TIMEOUT);
    assert!(
        out.success(),
        "{out}\n--- mailgate ---\n{}",
        setup.mailgate.log()
    );
    // Every synced message, as "folder: subject".
    let mut synced = Vec::new();
    let mut folders = vec![dir.clone()];
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder).expect("read dir").flatten() {
            let path = entry.path();
            let sub = path.file_name().map(|n| n.to_string_lossy().into_owned());
            if matches!(sub.as_deref(), Some("cur" | "new")) {
                for message in std::fs::read_dir(&path).expect("read dir").flatten() {
                    let text = std::fs::read_to_string(message.path()).unwrap_or_default();
                    let subject = text
                        .lines()
                        .find_map(|l| l.strip_prefix("Subject: "))
                        .unwrap_or_default()
                        .to_owned();
                    let name = folder
                        .strip_prefix(&dir)
                        .unwrap_or(&folder)
                        .display()
                        .to_string();
                    synced.push(format!("{name}: {subject}"));
                }
            } else if path.is_dir() {
                folders.push(path);
            }
        }
    }
    synced.sort();
    assert_eq!(
        synced,
        ["INBOX: in INBOX", "Work/Projects: in Work.Projects"],
        "{out}"
    );
}

#[test]
fn deleted_messages_go_at_once_and_big_messages_pass_intact() {
    let setup = Setup::start();
    let out = setup.python(
        r#"
def msg(i):
    return f"From: a@example.com\r\nSubject: m{i}\r\nMessage-ID: <m{i}@example.com>\r\n\r\nbody {i}\r\n".encode()
for user in ["grace@example.com", "henry@example.com"]:
    d = direct(user)
    d.create("Work")
    for i in range(5):
        d.append("INBOX", None, None, msg(i))
    d.logout()

def subjects(m, box):
    m.select(box, readonly=True)
    typ, data = m.fetch("1:*", "(FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    out = []
    for item in data:
        if isinstance(item, tuple):
            flags = "D" if b"\\Deleted" in item[0] else ""
            out.append(item[1].decode().strip().replace("Subject: ", "") + flags)
    return ",".join(out)

m = mg("grace@example.com")
m.select("INBOX")
typ, data = m.uid("STORE", "2", "+FLAGS.SILENT", "(\\Deleted)")
print("uid store:", typ)
m.noop()
print("expunged after uid store:", m.response("EXPUNGE")[1])
typ, data = m.store("1", "+FLAGS", "(\\Deleted)")
m.noop()
print("expunged after store:", m.response("EXPUNGE")[1])
# The old clients' move: COPY, then mark deleted.
m.copy("1", "Work")
m.store("1", "+FLAGS", "(\\Deleted)")
m.noop()
print("expunged after copy+store:", m.response("EXPUNGE")[1])

body = b"\r\n".join(base64.b64encode(os.urandom(57)) for _ in range(2 * 1024 * 1024 // 78))
big = b"From: a@example.com\r\nSubject: big\r\n\r\n" + body + b"\r\n"
typ, data = m.append("Work", None, None, big)
uid = re.search(rb"APPENDUID \d+ (\d+)", data[0]).group(1).decode()
m.select("Work")
typ, data = m.uid("FETCH", uid, "(BODY.PEEK[])")
got = data[0][1]
print("big:", len(got) == len(big), hashlib.sha256(got).hexdigest() == hashlib.sha256(big).hexdigest())
m.logout()

d = direct("grace@example.com")
print("grace inbox:", subjects(d, "INBOX"))
print("grace work:", subjects(d, "Work").replace(",big", ""))
d.logout()

m = mg("henry@example.com")
m.select("INBOX")
m.uid("STORE", "2", "+FLAGS", "(\\Deleted)")
m.noop()
print("henry expunged:", m.response("EXPUNGE")[1])
m.logout()
d = direct("henry@example.com")
print("henry inbox:", subjects(d, "INBOX"))
d.logout()
"#,
    );
    // UID 2 was message 2; then message 1 (m0); then the new message 1 (m2, copied first).
    assert_eq!(line(&out, "uid store"), "OK", "{out}");
    assert_eq!(line(&out, "expunged after uid store"), "[b'2']", "{out}");
    assert_eq!(line(&out, "expunged after store"), "[b'1']", "{out}");
    assert_eq!(line(&out, "expunged after copy+store"), "[b'1']", "{out}");
    assert_eq!(line(&out, "big"), "True True", "{out}");
    assert_eq!(line(&out, "grace inbox"), "m3,m4", "{out}");
    assert_eq!(line(&out, "grace work"), "m2", "{out}");
    // mark_only: the message stays, flagged.
    assert_eq!(line(&out, "henry expunged"), "[None]", "{out}");
    assert_eq!(line(&out, "henry inbox"), "m0,m1D,m2,m3,m4", "{out}");
}

#[test]
fn a_client_that_stays_after_logout_is_let_go_within_the_close_grace() {
    // dave's session is the plain splice, grace's the aware relay: after `LOGOUT`, Dovecot
    // closes, mailgate passes that on, and the clients never close their sockets.
    let setup = Setup::start();
    let out = setup.python(&format!(
        r#"
import time, urllib.request
def active():
    text = urllib.request.urlopen("http://{metrics}/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith('mailgate_connections_active{{listener="imaps"'):
            return int(float(line.split()[-1]))
held = []
for user in ["dave@example.com", "grace@example.com"]:
    m = mg(user)
    m.send(b"z LOGOUT\r\n")
    print(user, "after logout:", m.file.read().decode().replace("\r\n", " | "))
    print(user, "counted at its close:", active() >= 1)
    held.append(m)
start = time.time()
while active() and time.time() - start < 20:
    time.sleep(0.05)
print("active after:", active(), "in", round(time.time() - start, 1), "s")
"#,
        metrics = setup.mailgate.metrics_addr()
    ));
    for user in ["dave@example.com", "grace@example.com"] {
        let after = line(&out, &format!("{user} after logout"));
        assert!(
            after.starts_with("* BYE") && after.contains("z OK"),
            "{out}"
        );
        // Dovecot said its own goodbye: mailgate adds none.
        assert!(!after.contains("Lost the connection"), "{out}");
        assert_eq!(line(&out, &format!("{user} counted at its close")), "True");
    }
    let after = line(&out, "active after");
    let secs: f64 = after
        .split_ascii_whitespace()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(99.0);
    assert!(
        after.starts_with("0 ") && secs < 10.0,
        "mailgate still holds the sessions: {out}\n{}",
        setup.mailgate.log()
    );
    let log = setup.mailgate.log();
    for user in ["dave@example.com", "grace@example.com"] {
        assert!(
            log.lines()
                .any(|l| l.contains(&format!("user={user}")) && l.contains("end=closed")),
            "no closed session line for {user}:\n{log}"
        );
    }
}

#[test]
fn a_client_whose_mail_store_process_died_is_told_so_with_a_bye() {
    // grace's session is the aware relay, dave's the splice; the Dovecot `imap` process
    // serving each is killed (as by an OOM kill or a crash), found with ss by its socket.
    let setup = Setup::start();
    let out = setup.python(
        r#"
import os, re, signal, subprocess, time
def mail_store_pids():
    ss = subprocess.run(["ss", "-tnpH", "state", "established", "( sport = :%d )" % DOVECOT],
                        capture_output=True, text=True, timeout=10).stdout
    return {int(p) for p in re.findall(r'"imap",pid=(\d+)', ss)}
for user in ["grace@example.com", "dave@example.com"]:
    before = mail_store_pids()
    m = mg(user)
    m.select("INBOX")
    time.sleep(0.3)
    serving = mail_store_pids() - before
    print(user, "processes:", len(serving))
    for pid in serving:
        os.kill(pid, signal.SIGKILL)
    m.sock.settimeout(20)
    print(user, "read:", repr(m.file.read().decode()))
"#,
    );
    assert_eq!(line(&out, "grace@example.com processes"), "1", "{out}");
    assert_eq!(
        line(&out, "grace@example.com read"),
        "'* BYE [UNAVAILABLE] Lost the connection to the mail server, try again\\r\\n'",
        "{out}\n{}",
        setup.mailgate.log()
    );
    // The splice cannot know where a response ends: its client sees the close alone.
    assert_eq!(line(&out, "dave@example.com processes"), "1", "{out}");
    assert_eq!(line(&out, "dave@example.com read"), "''", "{out}");
    let log = setup.mailgate.log();
    let grace = common::line_with(&log, "user=grace@example.com");
    assert!(grace.contains("end=closed"), "{grace}");
}
