//! libnccl, opened at run time under the name NCCL actually ships as.
//!
//! cudarc's own loader asks for `libnccl.so` and numbered names that skip `.so.2`, the only name
//! the PyPI wheel and NVIDIA's packages install (and the one libtorch_cuda links, so in a CUDA
//! build opening that name returns the very library libtorch already loaded). The few entry points
//! the NCCL backend calls are therefore resolved here, from the first candidate that opens:
//!
//! 1. `$COSINE_NCCL_LIBRARY` (a path), when set: nothing else is tried;
//! 2. `libnccl.so.2` by name (already loaded, the binary's RUNPATH, LD_LIBRARY_PATH, ldconfig);
//! 3. `nvidia/nccl/lib/libnccl.so.2` of the wheel set holding the loaded libtorch, then of the
//!    one the binary was built against, by absolute path: no LD_LIBRARY_PATH needed;
//! 4. `libnccl.so` by name (a distribution's development link).
//!
//! cudarc still supplies the C types.

use std::ffi::{CStr, OsString, c_char, c_int, c_void};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use cudarc::nccl::sys::{cudaStream_t, ncclComm_t, ncclDataType_t, ncclRedOp_t, ncclUniqueId};

/// The environment variable naming the libnccl file to use instead of searching.
pub const OVERRIDE_VAR: &str = "COSINE_NCCL_LIBRARY";

type GetVersion = unsafe extern "C" fn(*mut c_int) -> c_int;
type GetUniqueId = unsafe extern "C" fn(*mut ncclUniqueId) -> c_int;
type CommInitRank = unsafe extern "C" fn(*mut ncclComm_t, c_int, ncclUniqueId, c_int) -> c_int;
type AllReduce = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    c_int,
    c_int,
    ncclComm_t,
    cudaStream_t,
) -> c_int;
type CommFree = unsafe extern "C" fn(ncclComm_t) -> c_int;
type GetErrorString = unsafe extern "C" fn(c_int) -> *const c_char;

/// An opened libnccl with the entry points the backend uses.
pub struct NcclLibrary {
    /// The name or path it was opened under.
    pub origin: String,
    get_version: GetVersion,
    get_unique_id: GetUniqueId,
    comm_init_rank: CommInitRank,
    all_reduce: AllReduce,
    comm_abort: CommFree,
    comm_destroy: CommFree,
    get_error_string: GetErrorString,
    // Keeps the function pointers above valid; never unloaded.
    _library: libloading::Library,
}

/// A failed NCCL call: its result code and NCCL's description of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NcclCallError {
    pub code: i32,
    pub message: String,
}

impl std::fmt::Display for NcclCallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NCCL result {}: {}", self.code, self.message)
    }
}

type CallResult<T> = std::result::Result<T, NcclCallError>;

/// The process's libnccl, opened on first use; the error lists every candidate tried and why
/// each failed.
pub fn library() -> std::result::Result<&'static NcclLibrary, String> {
    static LIBRARY: OnceLock<std::result::Result<NcclLibrary, String>> = OnceLock::new();
    LIBRARY
        .get_or_init(|| {
            let torch_dirs = [
                crate::runtime::libraries::loaded_libtorch_dir(),
                Some(PathBuf::from(env!("COSINE_LIBTORCH_LIB"))),
            ];
            open_first(&candidates(
                std::env::var_os(OVERRIDE_VAR),
                torch_dirs.iter().flatten().map(PathBuf::as_path),
            ))
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// The names and paths to try, in order (see the module documentation). `torch_lib_dirs` are
/// `torch/lib` directories; a wheel set keeps NCCL at `../../nvidia/nccl/lib` from there.
pub fn candidates<'a>(
    override_path: Option<OsString>,
    torch_lib_dirs: impl IntoIterator<Item = &'a Path>,
) -> Vec<OsString> {
    if let Some(path) = override_path.filter(|p| !p.is_empty()) {
        return vec![path];
    }
    let mut out: Vec<OsString> = vec!["libnccl.so.2".into()];
    for dir in torch_lib_dirs {
        let file = dir.join("../../nvidia/nccl/lib/libnccl.so.2");
        let file = std::fs::canonicalize(&file).unwrap_or(file);
        if file.is_file() && !out.contains(&file.clone().into_os_string()) {
            out.push(file.into_os_string());
        }
    }
    out.push("libnccl.so".into());
    out
}

/// Opens the first candidate that loads and has every entry point.
pub fn open_first(candidates: &[OsString]) -> std::result::Result<NcclLibrary, String> {
    let mut tried = Vec::new();
    for candidate in candidates {
        match open(candidate) {
            Ok(library) => return Ok(library),
            Err(why) => tried.push(format!("{}: {why}", candidate.to_string_lossy())),
        }
    }
    Err(format!(
        "libnccl could not be opened (tried {}); `COSINE_WITH_CUDA=1 make setup` installs it, \
         or set {OVERRIDE_VAR} to the path of libnccl.so.2",
        tried.join("; ")
    ))
}

/// The function `name` (NUL-terminated) of `library`, as a `T`.
///
/// # Safety
/// `T` must be the function's exact signature.
unsafe fn symbol<T: Copy>(
    library: &libloading::Library,
    name: &[u8],
) -> std::result::Result<T, String> {
    // SAFETY: the caller vouches for `T`.
    unsafe { library.get::<T>(name) }
        .map(|s| *s)
        .map_err(|e| e.to_string())
}

fn open(candidate: &OsString) -> std::result::Result<NcclLibrary, String> {
    // SAFETY: loading libnccl runs only its initialisers, which set up no process state that
    // outlives a failed symbol lookup.
    let library = unsafe { libloading::Library::new(candidate) }.map_err(|e| e.to_string())?;
    // SAFETY: each symbol is NCCL's C entry point with exactly the signature declared above
    // (nccl.h, 2.x); the pointers stay valid because `library` is kept in the result.
    unsafe {
        let get_version: GetVersion = symbol(&library, b"ncclGetVersion\0")?;
        let get_unique_id: GetUniqueId = symbol(&library, b"ncclGetUniqueId\0")?;
        let comm_init_rank: CommInitRank = symbol(&library, b"ncclCommInitRank\0")?;
        let all_reduce: AllReduce = symbol(&library, b"ncclAllReduce\0")?;
        let comm_abort: CommFree = symbol(&library, b"ncclCommAbort\0")?;
        let comm_destroy: CommFree = symbol(&library, b"ncclCommDestroy\0")?;
        let get_error_string: GetErrorString = symbol(&library, b"ncclGetErrorString\0")?;
        Ok(NcclLibrary {
            origin: candidate.to_string_lossy().into_owned(),
            get_version,
            get_unique_id,
            comm_init_rank,
            all_reduce,
            comm_abort,
            comm_destroy,
            get_error_string,
            _library: library,
        })
    }
}

impl NcclLibrary {
    fn check(&self, code: c_int) -> CallResult<()> {
        if code == 0 {
            return Ok(());
        }
        // SAFETY: ncclGetErrorString returns a static string for any code (or null).
        let text = unsafe { (self.get_error_string)(code) };
        let message = if text.is_null() {
            "no description".to_string()
        } else {
            // SAFETY: non-null, NUL-terminated and static, per nccl.h.
            unsafe { CStr::from_ptr(text) }
                .to_string_lossy()
                .into_owned()
        };
        Err(NcclCallError { code, message })
    }

    /// NCCL's version as "major.minor.patch" (since 2.9 the code is major*10000 + minor*100 +
    /// patch).
    pub fn version(&self) -> CallResult<String> {
        let mut code: c_int = 0;
        // SAFETY: a valid out-pointer.
        self.check(unsafe { (self.get_version)(&mut code) })?;
        Ok(format!(
            "{}.{}.{}",
            code / 10000,
            (code / 100) % 100,
            code % 100
        ))
    }

    pub fn unique_id(&self) -> CallResult<ncclUniqueId> {
        let mut id = ncclUniqueId { internal: [0; 128] };
        // SAFETY: a valid out-pointer.
        self.check(unsafe { (self.get_unique_id)(&mut id) })?;
        Ok(id)
    }

    /// # Safety
    /// Collective over `ranks` processes; every rank must call it with the same id.
    pub unsafe fn comm_init_rank(
        &self,
        ranks: i32,
        id: ncclUniqueId,
        rank: i32,
    ) -> CallResult<ncclComm_t> {
        let mut comm: ncclComm_t = std::ptr::null_mut();
        // SAFETY: a valid out-pointer; the caller guarantees the collective contract.
        self.check(unsafe { (self.comm_init_rank)(&mut comm, ranks, id, rank) })?;
        Ok(comm)
    }

    /// # Safety
    /// `send` and `recv` are device buffers of `count` elements of `dtype` on the communicator's
    /// GPU; `comm` is live; `stream` is a valid stream (null: the legacy default stream).
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn all_reduce(
        &self,
        send: *const c_void,
        recv: *mut c_void,
        count: usize,
        dtype: ncclDataType_t,
        op: ncclRedOp_t,
        comm: ncclComm_t,
        stream: cudaStream_t,
    ) -> CallResult<()> {
        // SAFETY: per the caller's contract; the enums are C enums passed by value.
        self.check(unsafe {
            (self.all_reduce)(send, recv, count, dtype as c_int, op as c_int, comm, stream)
        })
    }

    /// # Safety
    /// `comm` was created by [`Self::comm_init_rank`] and is not used afterwards.
    pub unsafe fn comm_abort(&self, comm: ncclComm_t) -> CallResult<()> {
        // SAFETY: per the caller's contract.
        self.check(unsafe { (self.comm_abort)(comm) })
    }

    /// # Safety
    /// `comm` was created by [`Self::comm_init_rank`] and is not used afterwards.
    pub unsafe fn comm_destroy(&self, comm: ncclComm_t) -> CallResult<()> {
        // SAFETY: per the caller's contract.
        self.check(unsafe { (self.comm_destroy)(comm) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_override_is_the_only_candidate() {
        let dir = tempfile::tempdir().unwrap();
        let got = candidates(Some("/x/libnccl.so.2".into()), [dir.path()]);
        assert_eq!(got, vec![OsString::from("/x/libnccl.so.2")]);
    }

    #[test]
    fn the_wheel_sets_nccl_is_found_by_path_after_the_plain_name() {
        let root = tempfile::tempdir().unwrap();
        let torch_lib = root.path().join("torch/lib");
        let nccl_lib = root.path().join("nvidia/nccl/lib");
        std::fs::create_dir_all(&torch_lib).unwrap();
        std::fs::create_dir_all(&nccl_lib).unwrap();
        std::fs::write(nccl_lib.join("libnccl.so.2"), b"").unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        let got = candidates(None, [torch_lib.as_path(), elsewhere.path(), &torch_lib]);
        let file = std::fs::canonicalize(nccl_lib.join("libnccl.so.2")).unwrap();
        assert_eq!(
            got,
            vec![
                OsString::from("libnccl.so.2"),
                file.into_os_string(),
                OsString::from("libnccl.so"),
            ]
        );
    }

    #[test]
    fn a_failed_open_names_every_candidate_and_the_override() {
        let dir = tempfile::tempdir().unwrap();
        let not_a_library = dir.path().join("libnccl.so.2");
        std::fs::write(&not_a_library, b"not an ELF file").unwrap();
        let missing = dir.path().join("absent.so");
        let err = open_first(&[not_a_library.clone().into(), missing.clone().into()])
            .err()
            .expect("neither opens");
        assert!(err.contains(&not_a_library.display().to_string()), "{err}");
        assert!(err.contains(&missing.display().to_string()), "{err}");
        assert!(err.contains(OVERRIDE_VAR), "{err}");
    }
}
