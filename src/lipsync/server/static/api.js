// Calls to this server's API, and its JSON errors in plain words.
//
// Every error the server sends is JSON {code, message, request_id, detail?} with a 4xx/5xx
// status; 503 answers carry Retry-After. `request` retries 503 "busy" answers by itself (telling
// the caller through onRetry) and throws an ApiError whose `.plain` is a sentence for people.

export class ApiError extends Error {
  constructor(status, body, field) {
    super(body?.message || `HTTP ${status}`);
    this.status = status;
    this.code = body?.code || 'http_' + status;
    this.detail = body?.detail || {};
    this.field = this.detail.field || field;
    this.plain = plainWords(this.code, this.detail, this.message, this.field);
  }
}

const FIELD_WORDS = { audio: 'recording', image: 'photo' };

/** A sentence for people for an error code (from lipsync.errors / server.errors). */
export function plainWords(code, detail = {}, message = '', field = '') {
  const what = FIELD_WORDS[field || detail.field] || 'file';
  switch (code) {
    case 'no_face':
      return 'No face was found in that photo. Try a clear, front-facing portrait with one face in it.';
    case 'corrupt_media':
      return what === 'photo'
        ? 'That photo could not be read (it may be damaged). Try another JPEG, PNG or WebP.'
        : 'That recording could not be read (it may be damaged or cut short). Record again or choose another file.';
    case 'unsupported_media':
      return what === 'photo'
        ? 'That file is not a photo we can use. Choose a JPEG, PNG or WebP.'
        : 'That file is not a recording we can read. Use WAV, MP3, OGG/Opus, WebM, FLAC or M4A.';
    case 'empty_audio':
      return 'The recording is empty: nothing was heard. Check the microphone and record again.';
    case 'audio_too_long': {
      const limit = detail.limit_s ?? detail.max_seconds;
      return limit
        ? `The speech is too long: the limit is ${Number(limit)} seconds. Record or choose something shorter.`
        : 'The speech is too long. Record or choose something shorter.';
    }
    case 'payload_too_large':
    case 'image_too_large':
      return `That ${what} is too large. Choose a smaller one.`;
    case 'avatar_not_found':
      return 'That face is no longer on the server. Add the portrait again.';
    case 'avatar_in_use':
      return 'This is the default face; make another face the default before deleting it.';
    case 'busy':
      return 'The server is busy with other videos. Please try again in a moment.';
    case 'shutting_down':
      return 'The server is restarting. Please try again in a moment.';
    case 'not_ready':
      return 'The server is still starting up. Please try again in a moment.';
    case 'timeout':
      return 'That took too long and was stopped. Try shorter speech or a smaller size.';
    case 'network':
      return 'The server could not be reached. Check that it is running and try again.';
    default:
      return message ? `Something went wrong: ${message}` : 'Something went wrong. Please try again.';
  }
}

const RETRY_CODES = new Set(['busy', 'not_ready', 'shutting_down']);
export const MAX_RETRIES = 5;

async function errorFrom(response, field) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  return new ApiError(response.status, body, field);
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * fetch(url, init) that returns an ok Response or throws ApiError.
 * `makeInit()` builds a fresh init per attempt (a FormData body cannot be sent twice in every
 * browser). On 503 with Retry-After it waits and retries up to MAX_RETRIES times, calling
 * `onRetry(seconds, attempt, error)` first, so the page can say so.
 */
export async function request(url, { makeInit = () => ({}), field, onRetry } = {}) {
  for (let attempt = 1; ; attempt += 1) {
    let response;
    try {
      response = await fetch(url, makeInit());
    } catch (e) {
      if (e?.name === 'AbortError') throw e;
      throw new ApiError(0, { code: 'network', message: String(e) }, field);
    }
    if (response.ok) return response;
    const err = await errorFrom(response, field);
    const retryAfter = Number(response.headers.get('Retry-After'));
    if (response.status === 503 && RETRY_CODES.has(err.code) && attempt <= MAX_RETRIES) {
      const seconds = Number.isFinite(retryAfter) && retryAfter > 0 ? Math.min(retryAfter, 30) : 2;
      onRetry?.(seconds, attempt, err);
      await sleep(seconds * 1000);
      continue;
    }
    throw err;
  }
}

export async function getJSON(url, opts) {
  return (await request(url, opts)).json();
}

/** Parse a Server-Timing header into [{name, ms, desc}]. */
export function parseServerTiming(header) {
  if (!header) return [];
  return header.split(',').map((part) => {
    const [name, ...params] = part.trim().split(';');
    const out = { name: name.trim(), ms: null, desc: '' };
    for (const p of params) {
      const [k, v] = p.trim().split('=');
      if (k === 'dur') out.ms = Number(v);
      if (k === 'desc') out.desc = (v || '').replace(/^"|"$/g, '');
    }
    return out;
  }).filter((t) => t.name);
}
