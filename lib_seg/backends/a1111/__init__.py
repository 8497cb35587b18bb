"""AUTOMATIC1111 (ldm/sgm UNets): module hooks on ``attn1.to_q`` (``patch``), the CFG-denoiser
step with the smoothed rows in the webui's own model call (``cfg_step``), the shared UNet prefix
(``prefix``) (row bookkeeping over nested conditioning is ``backends.batch_rows``)."""
