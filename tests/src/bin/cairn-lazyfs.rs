//! `cairn-lazyfs BACKING MOUNTPOINT`: a FUSE passthrough of BACKING at
//! MOUNTPOINT that can lose, on demand, every write no `fsync` covered: a
//! power loss under a running node, the model LazyFS implements (etcd and
//! Jepsen use it; TESTING.md names it).
//!
//! Writes go through to BACKING at once. Until a file is synced, each write
//! first keeps the bytes it overwrites (those below the file's size at its
//! last sync) and the size itself. A line `crash` on stdin (or stdin
//! closing) puts every file back as it was at its last sync, newest write
//! first, then unmounts and exits. The node above must be dead by then.
//! `crash torn SEED` loses only some of it, at random (see `lose_unsynced`).
//!
//! Not modelled: directory operations (create, rename, unlink) are durable
//! at once, as if every directory were synced after each; `syncfs` is not
//! seen (FUSE does not pass it on), so the node's folders must not be
//! mount points of their own. Test tool only: it runs as root and serves
//! one test's folder.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::{File, OpenOptions};
use std::io::BufRead;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};

/// Attributes and names are not cached by the kernel: sizes change under
/// it when a crash is played back (a new mount follows anyway).
const TTL: Duration = Duration::ZERO;

/// What a file looked like at its last sync, as far as writes since then
/// changed it.
struct Undo {
    len_at_sync: u64,
    /// (offset, bytes before the write), oldest first; only bytes below
    /// `len_at_sync` (what lies beyond is cut off by restoring the size).
    pieces: Vec<(u64, Vec<u8>)>,
}

#[derive(Default)]
struct State {
    /// FUSE inode number -> path below the backing folder.
    paths: HashMap<u64, PathBuf>,
    files: HashMap<u64, Arc<File>>,
    next_fh: u64,
    undo: HashMap<u64, Undo>,
}

struct Lazy {
    root: PathBuf,
    /// Shared with `main`, which plays the crash back.
    state: Arc<Mutex<State>>,
}

/// The backing inode number, shifted so that none is FUSE's root (1).
fn fuse_ino(md: &std::fs::Metadata) -> u64 {
    md.ino() + 2
}

fn kind_of(md: &std::fs::Metadata) -> FileType {
    let t = md.file_type();
    if t.is_dir() {
        FileType::Directory
    } else if t.is_symlink() {
        FileType::Symlink
    } else {
        FileType::RegularFile
    }
}

fn time(secs: i64, nsecs: i64) -> SystemTime {
    UNIX_EPOCH + Duration::new(secs.max(0) as u64, nsecs.clamp(0, 999_999_999) as u32)
}

fn attr(ino: u64, md: &std::fs::Metadata) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: md.size(),
        blocks: md.blocks(),
        atime: time(md.atime(), md.atime_nsec()),
        mtime: time(md.mtime(), md.mtime_nsec()),
        ctime: time(md.ctime(), md.ctime_nsec()),
        crtime: time(md.ctime(), md.ctime_nsec()),
        kind: kind_of(md),
        perm: (md.mode() & 0o7777) as u16,
        nlink: md.nlink() as u32,
        uid: md.uid(),
        gid: md.gid(),
        rdev: md.rdev() as u32,
        blksize: md.blksize() as u32,
        flags: 0,
    }
}

fn errno(e: std::io::Error) -> Errno {
    Errno::from(e)
}

impl Lazy {
    fn path(&self, ino: INodeNo) -> Result<PathBuf, Errno> {
        if ino.0 == 1 {
            return Ok(self.root.clone());
        }
        let st = self.state.lock().unwrap();
        st.paths
            .get(&ino.0)
            .map(|p| self.root.join(p))
            .ok_or(Errno::ENOENT)
    }

    fn child(&self, parent: INodeNo, name: &OsStr) -> Result<PathBuf, Errno> {
        Ok(self.path(parent)?.join(name))
    }

    /// Looks a path up and remembers its inode.
    fn remember(&self, full: &Path) -> Result<(u64, std::fs::Metadata), Errno> {
        let md = std::fs::symlink_metadata(full).map_err(errno)?;
        let ino = fuse_ino(&md);
        let rel = full.strip_prefix(&self.root).unwrap_or(full).to_path_buf();
        self.state.lock().unwrap().paths.insert(ino, rel);
        Ok((ino, md))
    }

    fn file(&self, fh: FileHandle) -> Result<Arc<File>, Errno> {
        self.state
            .lock()
            .unwrap()
            .files
            .get(&fh.0)
            .cloned()
            .ok_or(Errno::EBADF)
    }

    fn add_handle(&self, f: File) -> u64 {
        let mut st = self.state.lock().unwrap();
        st.next_fh += 1;
        let fh = st.next_fh;
        st.files.insert(fh, Arc::new(f));
        fh
    }

    /// Keeps what `[offset, offset + len)` of `ino` holds now, before it
    /// changes, unless a sync covered the change already.
    fn keep_before_change(&self, ino: u64, f: &File, offset: u64, len: u64) -> Result<(), Errno> {
        let cur = f.metadata().map_err(errno)?.len();
        let mut st = self.state.lock().unwrap();
        let undo = st.undo.entry(ino).or_insert_with(|| Undo {
            len_at_sync: cur,
            pieces: Vec::new(),
        });
        let end = (offset + len).min(undo.len_at_sync).min(cur);
        if offset < end {
            let mut old = vec![0u8; (end - offset) as usize];
            f.read_exact_at(&mut old, offset).map_err(errno)?;
            undo.pieces.push((offset, old));
        }
        Ok(())
    }

    /// Forgets an inode whose last name went away.
    fn forget_ino(&self, ino: u64) {
        let mut st = self.state.lock().unwrap();
        st.paths.remove(&ino);
        st.undo.remove(&ino);
    }
}

/// Puts every file below `root` back as it was at its last sync; returns
/// how many files that changed. With `torn`, a seed, only some of what was
/// written since is lost, as page-cache writeback in no particular order
/// leaves it: each overwrite is undone or not, each 4 KiB page past the
/// synced size reads as zeros or keeps its data, and the size stays (some
/// filesystems persist a size before the data).
fn lose_unsynced(root: &Path, state: &Mutex<State>, torn: Option<u64>) -> usize {
    let st = std::mem::take(&mut *state.lock().unwrap());
    let mut coin = torn.map(|seed| {
        let mut x = seed | 1;
        move || {
            // xorshift64: a seeded coin without a dependency.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x & 1 == 1
        }
    });
    let mut n = 0;
    for (ino, undo) in st.undo {
        let Some(rel) = st.paths.get(&ino) else {
            continue;
        };
        let path = root.join(rel);
        let Ok(f) = OpenOptions::new().write(true).open(&path) else {
            continue;
        };
        n += 1;
        let Some(lose) = coin.as_mut() else {
            for (off, old) in undo.pieces.iter().rev() {
                f.write_all_at(old, *off).expect("restore unsynced bytes");
            }
            f.set_len(undo.len_at_sync)
                .expect("restore the synced size");
            continue;
        };
        for (off, old) in undo.pieces.iter().rev() {
            if lose() {
                f.write_all_at(old, *off).expect("restore unsynced bytes");
            }
        }
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let mut page = undo.len_at_sync / 4096 * 4096;
        while page < len {
            if lose() {
                let from = page.max(undo.len_at_sync);
                let to = (page + 4096).min(len);
                f.write_all_at(&vec![0u8; (to - from) as usize], from)
                    .expect("lose an unsynced page");
            }
            page += 4096;
        }
    }
    n
}

impl Filesystem for Lazy {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.child(parent, name).and_then(|p| self.remember(&p)) {
            Ok((ino, md)) => reply.entry(&TTL, &attr(ino, &md), Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self
            .path(ino)
            .and_then(|p| std::fs::symlink_metadata(p).map_err(errno))
        {
            Ok(md) => reply.attr(&TTL, &attr(ino.0, &md)),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let res = (|| {
            let path = self.path(ino)?;
            if let Some(m) = mode {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(m))
                    .map_err(errno)?;
            }
            if let Some(len) = size {
                let f = OpenOptions::new()
                    .write(true)
                    .read(true)
                    .open(&path)
                    .map_err(errno)?;
                let cur = f.metadata().map_err(errno)?.len();
                if len < cur {
                    self.keep_before_change(ino.0, &f, len, cur - len)?;
                } else {
                    self.keep_before_change(ino.0, &f, cur, 0)?;
                }
                f.set_len(len).map_err(errno)?;
            }
            std::fs::symlink_metadata(&path).map_err(errno)
        })();
        match res {
            Ok(md) => reply.attr(&TTL, &attr(ino.0, &md)),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let res = self.child(parent, name).and_then(|p| {
            std::fs::DirBuilder::new()
                .mode(mode)
                .create(&p)
                .map_err(errno)?;
            self.remember(&p)
        });
        match res {
            Ok((ino, md)) => reply.entry(&TTL, &attr(ino, &md), Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let res = self.child(parent, name).and_then(|p| {
            let md = std::fs::symlink_metadata(&p).map_err(errno)?;
            std::fs::remove_file(&p).map_err(errno)?;
            if md.nlink() <= 1 {
                self.forget_ino(fuse_ino(&md));
            }
            Ok(())
        });
        match res {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let res = self.child(parent, name).and_then(|p| {
            let md = std::fs::symlink_metadata(&p).map_err(errno)?;
            std::fs::remove_dir(&p).map_err(errno)?;
            self.forget_ino(fuse_ino(&md));
            Ok(())
        });
        match res {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let res = (|| {
            let from = self.child(parent, name)?;
            let to = self.child(newparent, newname)?;
            // The file renamed over is gone: its unsynced writes with it.
            if let Ok(md) = std::fs::symlink_metadata(&to) {
                if md.nlink() <= 1 && !md.is_dir() {
                    self.forget_ino(fuse_ino(&md));
                }
            }
            std::fs::rename(&from, &to).map_err(errno)?;
            let old_rel = from.strip_prefix(&self.root).unwrap_or(&from).to_path_buf();
            let new_rel = to.strip_prefix(&self.root).unwrap_or(&to).to_path_buf();
            let mut st = self.state.lock().unwrap();
            for p in st.paths.values_mut() {
                if let Ok(rest) = p.strip_prefix(&old_rel) {
                    *p = new_rel.join(rest);
                }
            }
            Ok(())
        })();
        match res {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let res = self.path(ino).and_then(|p| {
            let acc = flags.0 & libc::O_ACCMODE;
            // Readable even when opened write-only: a write keeps the
            // bytes it overwrites, read through the same handle.
            OpenOptions::new()
                .read(true)
                .write(acc != libc::O_RDONLY)
                .custom_flags(flags.0 & libc::O_APPEND)
                .open(p)
                .map_err(errno)
        });
        match res {
            Ok(f) => reply.opened(FileHandle(self.add_handle(f)), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let res = self.child(parent, name).and_then(|p| {
            let acc = flags & libc::O_ACCMODE;
            let f = OpenOptions::new()
                .read(true)
                .write(acc != libc::O_RDONLY)
                .create(true)
                .truncate(flags & libc::O_TRUNC != 0)
                .custom_flags(flags & (libc::O_EXCL | libc::O_APPEND))
                .mode(mode)
                .open(&p)
                .map_err(errno)?;
            let (ino, md) = self.remember(&p)?;
            Ok((ino, md, f))
        });
        match res {
            Ok((ino, md, f)) => {
                let fh = self.add_handle(f);
                reply.created(
                    &TTL,
                    &attr(ino, &md),
                    Generation(0),
                    FileHandle(fh),
                    FopenFlags::empty(),
                )
            }
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let res = self.file(fh).and_then(|f| {
            let mut buf = vec![0u8; size as usize];
            let mut got = 0;
            while got < buf.len() {
                match f.read_at(&mut buf[got..], offset + got as u64) {
                    Ok(0) => break,
                    Ok(n) => got += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(errno(e)),
                }
            }
            buf.truncate(got);
            Ok(buf)
        });
        match res {
            Ok(b) => reply.data(&b),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let res = self.file(fh).and_then(|f| {
            self.keep_before_change(ino.0, &f, offset, data.len() as u64)?;
            f.write_all_at(data, offset).map_err(errno)
        });
        match res {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.state.lock().unwrap().files.remove(&fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let res = self.file(fh).and_then(|f| f.sync_data().map_err(errno));
        match res {
            Ok(()) => {
                self.state.lock().unwrap().undo.remove(&ino.0);
                reply.ok()
            }
            Err(e) => reply.error(e),
        }
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.opened(FileHandle(0), FopenFlags::empty());
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let res = self.path(ino).and_then(|p| {
            let mut out: Vec<(u64, FileType, OsString)> = vec![
                (ino.0, FileType::Directory, ".".into()),
                (ino.0, FileType::Directory, "..".into()),
            ];
            for e in std::fs::read_dir(&p).map_err(errno)? {
                let e = e.map_err(errno)?;
                let md = e.metadata().map_err(errno)?;
                let rel = e
                    .path()
                    .strip_prefix(&self.root)
                    .unwrap_or(&e.path())
                    .to_path_buf();
                self.state.lock().unwrap().paths.insert(fuse_ino(&md), rel);
                out.push((fuse_ino(&md), kind_of(&md), e.file_name()));
            }
            Ok(out)
        });
        match res {
            Ok(entries) => {
                for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
                    if reply.add(INodeNo(*ino), (i + 1) as u64, *kind, name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    // statvfs's field types differ between targets (u32 on some 32-bit ones).
    #[allow(clippy::unnecessary_cast)]
    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match statvfs(&self.root) {
            Ok(s) => reply.statfs(
                s.f_blocks as u64,
                s.f_bfree as u64,
                s.f_bavail as u64,
                s.f_files as u64,
                s.f_ffree as u64,
                s.f_bsize as u32,
                255,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        reply.ok();
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let res = self.file(fh).and_then(|f| {
            if mode & libc::FALLOC_FL_PUNCH_HOLE != 0 {
                self.keep_before_change(ino.0, &f, offset, length)?;
            } else {
                self.keep_before_change(ino.0, &f, offset, 0)?;
            }
            use std::os::fd::AsRawFd;
            // SAFETY: fallocate(2) on a descriptor we own; no memory is passed.
            #[allow(unsafe_code)]
            let rc = unsafe {
                libc::fallocate(
                    f.as_raw_fd(),
                    mode,
                    offset as libc::off_t,
                    length as libc::off_t,
                )
            };
            if rc == 0 {
                Ok(())
            } else {
                Err(errno(std::io::Error::last_os_error()))
            }
        });
        match res {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }
}

fn statvfs(p: &Path) -> Result<libc::statvfs, Errno> {
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(|_| Errno::EINVAL)?;
    let mut s = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a valid C string and `s` is large enough for the struct
    // statvfs(3) fills; it is read only after a successful call.
    #[allow(unsafe_code)]
    unsafe {
        if libc::statvfs(c.as_ptr(), s.as_mut_ptr()) != 0 {
            return Err(errno(std::io::Error::last_os_error()));
        }
        Ok(s.assume_init())
    }
}

fn main() -> std::io::Result<()> {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [backing, mountpoint] = args.as_slice() else {
        eprintln!("usage: cairn-lazyfs BACKING MOUNTPOINT  (then `crash` on stdin)");
        std::process::exit(2);
    };
    let root = backing.canonicalize()?;
    let state = Arc::new(Mutex::new(State::default()));
    let fs = Lazy {
        root: root.clone(),
        state: state.clone(),
    };
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName("cairn-lazyfs".into()),
        fuser::MountOption::RW,
    ];
    config.acl = fuser::SessionACL::All;
    let session = fuser::spawn_mount(fs, mountpoint, &config)?;
    println!("mounted");
    let mut torn = None;
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["crash"] => break,
            ["crash", "torn", seed] => {
                torn = Some(seed.parse().unwrap_or(1));
                break;
            }
            _ => eprintln!("cairn-lazyfs: unknown command {line:?}"),
        }
    }
    let n = lose_unsynced(&root, &state, torn);
    drop(session);
    println!("lost unsynced writes of {n} files");
    Ok(())
}
