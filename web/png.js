// Reading the workflow a generated PNG carries: SaveImage writes it as a text chunk (tEXt, or iTXt/zTXt) with the
// keyword "nodegraph_workflow"; ComfyUI writes its editor's document under "workflow" and its API prompt under
// "prompt". Chunks are parsed by hand; compressed text is inflated with DecompressionStream.

export const WORKFLOW_KEYWORD = "nodegraph_workflow";
const SIGNATURE = [137, 80, 78, 71, 13, 10, 26, 10];

export function isPng(bytes) {
  return bytes.length >= 8 && SIGNATURE.every((b, i) => bytes[i] === b);
}

async function inflate(data) {
  const stream = new Blob([data]).stream().pipeThrough(new DecompressionStream("deflate"));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

function indexOfZero(bytes, from) {
  for (let i = from; i < bytes.length; i++) if (bytes[i] === 0) return i;
  return -1;
}

const latin1 = new TextDecoder("latin1");
const utf8 = new TextDecoder("utf-8");

/** Every text chunk of a PNG as {keyword: text}. */
export async function pngTextChunks(buffer) {
  const bytes = new Uint8Array(buffer);
  if (!isPng(bytes)) throw new Error("not a PNG file");
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const out = {};
  let offset = 8;
  while (offset + 8 <= bytes.length) {
    const length = view.getUint32(offset);
    const type = latin1.decode(bytes.subarray(offset + 4, offset + 8));
    const start = offset + 8;
    const end = start + length;
    if (end > bytes.length) break;
    const data = bytes.subarray(start, end);
    if (type === "tEXt") {
      const zero = indexOfZero(data, 0);
      if (zero > 0) out[latin1.decode(data.subarray(0, zero))] = latin1.decode(data.subarray(zero + 1));
    } else if (type === "zTXt") {
      const zero = indexOfZero(data, 0);
      if (zero > 0) {
        out[latin1.decode(data.subarray(0, zero))] = latin1.decode(await inflate(data.subarray(zero + 2)));
      }
    } else if (type === "iTXt") {
      const zero = indexOfZero(data, 0);
      if (zero > 0) {
        const keyword = latin1.decode(data.subarray(0, zero));
        const compressed = data[zero + 1] === 1;
        const langEnd = indexOfZero(data, zero + 3);
        const transEnd = langEnd < 0 ? -1 : indexOfZero(data, langEnd + 1);
        if (transEnd >= 0) {
          const text = data.subarray(transEnd + 1);
          out[keyword] = utf8.decode(compressed ? await inflate(text) : text);
        }
      }
    } else if (type === "IEND") {
      break;
    }
    offset = end + 4; // skip the CRC
  }
  return out;
}

/** The workflow document in a PNG, or null when it carries none. */
export async function workflowFromPng(buffer) {
  const chunks = await pngTextChunks(buffer);
  const text = chunks[WORKFLOW_KEYWORD];
  return text ? JSON.parse(text) : null;
}

/** The workflow document in a PNG, ours or ComfyUI's (its editor's document first: it keeps the layout), or null. */
export async function documentFromPng(buffer) {
  const chunks = await pngTextChunks(buffer);
  for (const keyword of [WORKFLOW_KEYWORD, "workflow", "prompt"]) {
    if (chunks[keyword]) return JSON.parse(chunks[keyword]);
  }
  return null;
}
